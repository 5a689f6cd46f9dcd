"""Fidelity of the Pascal / GTX 16xx path: FP16 weights computing in FP32, against FP32 (issue #17 item 3).

    python bench/half_compute_fidelity.py                      # CPU, trained demo model: a few minutes
    python bench/half_compute_fidelity.py --smoke --out /tmp/half_compute_fidelity.json

The path stores the UNet in fp16 and up-casts each layer's weights to fp32 just before it runs (diffusers'
layerwise casting, ``half_compute="fp32"``): only the weights are rounded, the arithmetic stays fp32. It is
compared with the plain FP32 run of the same held-out clip and seed (the trained demo model,
assets/demo-model/, on clips no training stream saw: lowvram_studio.demo_training.evaluate), by PSNR over
the clip and mean per-frame SSIM (monitor.report.psnr_ssim). Also: fp16 compute (weights and arithmetic in
fp16, what Turing RTX and newer run), and the same path with the VAE and image encoder stored in fp16 too.
Runs on the CPU, where fp16 arithmetic is exact IEEE fp16 as on a GPU but without tensor-core accumulation
order: the fp16-compute row is indicative, the fp32-compute rows are the arithmetic a Pascal card runs.

The demo model's weights were saved in fp16, so storing them in fp16 rounds nothing ("as shipped": the
path is bit-identical to FP32 there, as for any checkpoint published in fp16). Checkpoints published in
fp32 are rounded, so every clip also runs on a "dithered" copy: each weight times (1 + u * 2^-11), u
uniform in [-1, 1] (seed 0), i.e. up to half an fp16 step off the fp16 grid, as a trained fp32 weight is;
its own FP32 run is that row's reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import new_report, write_report  # noqa: E402
from lowvram_studio.demo_training.evaluate import held_out_clips  # noqa: E402
from lowvram_studio.demo_training.procedural import ClipSpec  # noqa: E402
from lowvram_studio.settings_adapter import generate  # noqa: E402
from lowvram_studio.models.demo import build_demo_pipeline, demo_model_info  # noqa: E402
from lowvram_studio.monitor.report import psnr_ssim  # noqa: E402
from lowvram_studio.settings import RunSettings  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "UNet fp16 storage + fp32 compute (Pascal / GTX 16xx path)": {"unet_dtype": "fp16", "half_compute": "fp32"},
    "UNet, VAE, encoder fp16 storage + fp32 compute": {"unet_dtype": "fp16", "vae_dtype": "fp16",
                                                       "encoder_dtype": "fp16", "half_compute": "fp32"},
    "UNet fp16 compute (Turing RTX+ path)": {"unet_dtype": "fp16", "half_compute": "fp16"},
}


WEIGHTS = ("as shipped (fp16-exact)", "dithered off the fp16 grid")


def dither(pipeline: Any, seed: int = 0) -> Any:
    """Move every weight up to half an fp16 step (relative 2^-11) off the fp16 grid, seeded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("unet", "vae", "image_encoder"):
            for param in getattr(pipeline, name).parameters():
                noise = torch.rand(param.shape, generator=generator, dtype=torch.float64) * 2 - 1
                param.mul_((1 + noise * 2.0**-11).to(param.dtype))
    return pipeline


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: mean and worst PSNR (identical clips, PSNR inf, counted apart) and mean SSIM."""
    out = []
    for weights, name in ((w, n) for w in WEIGHTS for n in CONFIGS):
        mine = [r for r in rows if (r["weights"], r["config"]) == (weights, name)]
        finite = [r["psnr_db"] for r in mine if r["psnr_db"] is not None]
        if mine:
            out.append({"weights": weights, "config": name, "clips": len(mine), "identical_clips": len(mine) - len(finite),
                        "psnr_db_mean": round(float(np.mean(finite)), 2) if finite else None,
                        "psnr_db_min": round(min(finite), 2) if finite else None,
                        "ssim_mean": round(float(np.mean([r["ssim"] for r in mine])), 5),
                        "ssim_min": round(min(r["ssim"] for r in mine), 5),
                        "execution_path": mine[0]["execution_path"], "precision": mine[0]["precision"]})
    return out


def table(summary: list[dict[str, Any]]) -> list[str]:
    lines = ["PSNR / SSIM against the plain FP32 run of the same clip and seed (F1 target: >= 35 dB).", "",
             "| weights | configuration | clips | PSNR dB mean (min) | SSIM mean (min) | precision |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        psnr = "identical" if s["psnr_db_mean"] is None else f"{s['psnr_db_mean']:.1f} ({s['psnr_db_min']:.1f})"
        precision = ", ".join(f"{k} {v}" for k, v in s["precision"].items())
        lines.append(f"| {s['weights']} | {s['config']} | {s['clips']} | {psnr} | {s['ssim_mean']:.4f} ({s['ssim_min']:.4f}) | "
                     f"{precision} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path,
                        default=Path(f"bench/results/half_compute_fidelity_{time.strftime('%Y%m%d')}.json"))
    parser.add_argument("--clips", type=int, default=4, help="held-out clips (one per motion class in turn)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="1 clip of 4 frames at 64 px, 3 steps")
    args = parser.parse_args()
    info = demo_model_info()
    spec = ClipSpec(num_frames=4, size=64) if args.smoke else ClipSpec()
    steps = 3 if args.smoke else args.steps
    clips = held_out_clips(1 if args.smoke else args.clips, spec)
    # Rounding weights is one-way (the engine refuses to widen them): every configuration gets its own copy.
    pipelines = {(weights, name): dither(build_demo_pipeline()) if weights == WEIGHTS[1] else build_demo_pipeline()
                 for weights in WEIGHTS for name in ("reference", *CONFIGS)}
    report = new_report(model={"weights": info.note, "trained": info.trained}, device="cpu", frames=spec.num_frames,
                        size=spec.size, steps=steps, reference="the plain FP32 run of the same clip and seed",
                        summary=[], rows=[])
    for clip in clips:
        base = RunSettings(height=spec.size, width=spec.size, num_frames=spec.num_frames, num_inference_steps=steps,
                           seed=clip.seed % 2**31, motion_bucket_id=clip.motion_bucket_id, device="cpu",
                           unet_dtype="fp32")
        image = PIL.Image.fromarray(clip.frames[0])
        for weights in WEIGHTS:
            reference = generate(pipelines[weights, "reference"], image, base).frames
            for name, changes in CONFIGS.items():
                result = generate(pipelines[weights, name], image, base.replace(**changes))
                psnr, ssim = psnr_ssim(result.frames, reference)
                report["rows"].append({
                    "clip_seed": clip.seed, "motion": clip.motion.value, "weights": weights, "config": name,
                    "psnr_db": round(psnr, 3) if np.isfinite(psnr) else None, "ssim": round(ssim, 6),
                    "max_abs": float(np.abs(result.frames - reference).max()),
                    "execution_path": result.info.get("execution_path"), "precision": result.info.get("precision"),
                })
        report["summary"] = summarise(report["rows"])
        print(f"clip {clip.seed} ({clip.motion.value}) done", flush=True)
    write_report(args.out, "FP16 storage + FP32 compute vs FP32, trained demo model on the CPU", report,
                 table(report["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
