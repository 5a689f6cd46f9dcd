"""What the live latent preview costs on the GPU: time per preview, memory, and proof it changes nothing.

Full-size SVD-XT architecture, random weights seeded 0, all components fp16, cases A (512x512x24) and
B (576x1024x25), 8 steps (the cost per step does not need 25). Each case runs with a preview every step
and with the preview off; rows give s/step, torch peak, ms per preview (copy x0 to the CPU + project +
resize) and the max abs difference of the frames (must be 0). A 1-step warm-up run per case comes first. A first row times fitting the projection
on the host CPU against the full-size VAE (what a user model costs once, on first load).

    python bench/preview_cost.py --out $OUT/preview_cost.json     # H100, ~2 minutes
    python bench/preview_cost.py --smoke --out /tmp/preview_cost.json  # demo model on the CPU, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowvram_studio.engine.preview import attach_latent_rgb  # noqa: E402
from lowvram_studio.engine.fingerprint import weights_fingerprint  # noqa: E402
from lowvram_studio.models.latent_rgb import fit_latent_rgb, fitting_images  # noqa: E402
from lowvram_studio.settings_adapter import generate  # noqa: E402
from lowvram_studio.settings import RunSettings  # noqa: E402

from common import new_report, write_report  # noqa: E402  (bench/common.py)

CASES = {"A": (512, 512, 24), "B": (576, 1024, 25)}


def test_image(height: int, width: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray((np.stack([x / (width - 1), y / (height - 1), 0.5 + 0 * x], -1) * 255).astype(np.uint8))


def build(smoke: bool):
    """The pipeline and the cases to run: SVD-XT fp16 on CUDA, or the demo model on the CPU (--smoke)."""
    if smoke:
        from lowvram_studio.models.demo import build_demo_pipeline

        return build_demo_pipeline(with_preview=False), {"smoke": (64, 64, 6)}, "cpu"
    from lowvram_studio.models.svd_configs import build_svd_xt_pipeline

    return build_svd_xt_pipeline(torch.float16, "cuda"), CASES, "cuda"


def fit_row(pipeline) -> dict:
    started = time.perf_counter()
    fingerprint = weights_fingerprint(pipeline.vae)
    fingerprint_s = time.perf_counter() - started
    projection = fit_latent_rgb(pipeline.vae, fitting_images())
    attach_latent_rgb(pipeline, projection)
    return {"case": "-", "config": "fit projection on the host CPU", "steps": None,
            "fit_seconds": time.perf_counter() - started, "fingerprint_seconds": fingerprint_s,
            "fit_images": projection.fit["images"], "fit_rmse": projection.fit["rmse"],
            "cpu_threads": torch.get_num_threads()}


def run_row(pipeline, case: str, size: tuple[int, int, int], every: int, steps: int, device: str) -> tuple[dict, np.ndarray]:
    height, width, frames = size
    settings = RunSettings(height=height, width=width, num_frames=frames, num_inference_steps=steps, seed=0,
                           device=device, unet_dtype="fp16" if device == "cuda" else "fp32",
                           vae_dtype="fp16" if device == "cuda" else "fp32",
                           encoder_dtype="fp16" if device == "cuda" else "fp32", preview_every=every)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = generate(pipeline, test_image(height, width), settings)
    preview = result.info["preview"]
    row = {"case": case, "config": f"preview every {every}" if every else "preview off", "steps": steps,
           "seconds_per_step": result.seconds_per_step,
           "torch_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
           "ms_per_preview": preview["ms_per_preview"], "ms_max": preview["ms_max"], "previews": preview["count"]}
    return row, result.frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="demo model on the CPU, 2 steps: checks the script")
    args = parser.parse_args()
    steps = 2 if args.smoke else args.steps
    pipeline, cases, device = build(args.smoke)
    rows = [fit_row(pipeline)]
    print(rows[-1], flush=True)
    for case, size in cases.items():
        run_row(pipeline, case, size, 0, 1, device)  # warm-up: first-call costs belong to neither row
        on, frames_on = run_row(pipeline, case, size, 1, steps, device)
        off, frames_off = run_row(pipeline, case, size, 0, steps, device)
        for row in (on, off):
            row["max_abs_vs_other"] = float(np.abs(frames_on - frames_off).max())
            row["ratio_s_per_step_vs_off"] = row["seconds_per_step"] / off["seconds_per_step"]
            rows.append(row)
            print(row, flush=True)

    report = new_report(rows=rows)
    fit = rows[0]
    lines = [f"Fit on the host CPU ({fit['cpu_threads']} threads): {fit['fit_seconds']:.1f} s "
             f"(fingerprint {fit['fingerprint_seconds']:.2f} s), {fit['fit_images']} images, RMSE {fit['fit_rmse']:.3f}", "",
             "| case | config | steps | s/step | x off | torch peak MiB | ms/preview | ms max | previews | max abs on vs off |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        peak = f"{r['torch_peak_mib']:.0f}" if r["torch_peak_mib"] is not None else "n/a"
        ms = f"{r['ms_per_preview']:.2f}" if r["ms_per_preview"] is not None else "-"
        ms_max = f"{r['ms_max']:.2f}" if r["ms_max"] is not None else "-"
        lines.append(f"| {r['case']} | {r['config']} | {r['steps']} | {r['seconds_per_step']:.3f} | "
                     f"{r['ratio_s_per_step_vs_off']:.3f} | {peak} | {ms} | {ms_max} | {r['previews']} | "
                     f"{r['max_abs_vs_other']:.1e} |")
    write_report(args.out, "Live preview cost", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
