"""What each lossy or "lossless" setting costs in fidelity, on a model that really denoises (issue 10 item 4).

Random full-size weights give the real memory and speed but meaningless fidelity: their output is
not a picture, and reusing deep features of a random UNet changes almost nothing (pruning showed
~70 dB there). This bench runs the trained demo model (assets/demo-model/) on held-out procedural
clips (seeds no training stream saw, one clip per motion class in turn; the clip's first frame is
the input, its motion bucket the conditioning) and compares every setting with the plain FP32 run
of the same clip and seed: PSNR over the clip and mean per-frame SSIM (monitor.report.psnr_ssim),
plus, for pruning, the reused fraction and the FLOP speedup estimate. Speed is not measured here:
the demo model is tiny; speed figures come from bench/pruning.py and bench/engine.py on full-size
SVD-XT.

    python bench/demo_fidelity.py --out bench/results/demo_fidelity_YYYYMMDD.json         # GPU: ~3 min
    python bench/demo_fidelity.py --smoke --out /tmp/demo_fidelity.json                  # CPU logic check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowvram_studio.demo_training.evaluate import held_out_clips  # noqa: E402
from lowvram_studio.demo_training.procedural import ClipSpec, MotionClass  # noqa: E402
from lowvram_studio.settings_adapter import generate  # noqa: E402
from lowvram_studio.models.demo import build_demo_pipeline, demo_model_info  # noqa: E402
from lowvram_studio.monitor.report import psnr_ssim  # noqa: E402
from lowvram_studio.settings import Precision, RunSettings  # noqa: E402
from lowvram_studio.sysinfo import collect_env  # noqa: E402

logger = logging.getLogger("bench.demo_fidelity")

LOSSLESS = {"cfg_split": True, "spatial_chunk": 2, "temporal_chunk": 64, "ff_chunk": 128}


def configurations(cuda: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(group, name, RunSettings changes) against the plain FP32 run; fp16 only where a GPU computes it."""
    rows: list[tuple[str, str, dict[str, Any]]] = [
        ("lossless", "CFG split + spatial/temporal/FF chunks (fp32)", dict(LOSSLESS)),
        ("decode", "decode chunk 7 (two halves)", {"decode_frames": 7}),
        ("decode", "decode chunk 2", {"decode_frames": 2}),
        ("decode", "VAE tiles 64 px", {"vae_tile": 64}),
    ]
    if cuda:
        rows = [
            ("precision", "FP16 UNet (VAE, encoder FP32)", {"unet_dtype": "fp16"}),
            ("precision", "FP16 UNet + lossless chunks", {"unet_dtype": "fp16", **LOSSLESS}),
            ("precision", "BF16 UNet", {"unet_dtype": "bf16"}),
            ("precision", "FP16 UNet + FP16 VAE", {"unet_dtype": "fp16", "vae_dtype": "fp16"}),
            *rows,
        ]
    windows = [(8, 4, "flat"), (8, 4, "linear"), (8, 4, "pyramid"), (10, 6, "pyramid"), (7, 2, "pyramid")]
    for chunk, overlap, blend in windows:
        rows.append(
            ("windows", f"windows {chunk} frames, overlap {overlap}, {blend}",
             {"window_frames": chunk, "overlap": overlap, "window_blend": blend})
        )
    prune = [
        ("steps 0.004", 0.004, "steps", {}),
        ("steps 0.012 (default)", 0.012, "steps", {}),
        ("steps 0.03", 0.03, "steps", {}),
        ("steps 0.05, cap 5", 0.05, "steps", {"prune_max_reuse": 5}),
        ("uniform every 3rd step", 1.0, "steps", {"prune_max_reuse": 2}),
        ("uniform every 4th step", 1.0, "steps", {"prune_max_reuse": 3}),
        ("branch 0: steps 0.012", 0.012, "steps", {"prune_branch_layers": 0}),
        ("branch 0: steps 0.05, cap 5", 0.05, "steps", {"prune_branch_layers": 0, "prune_max_reuse": 5}),
        ("branch 0: uniform every 3rd step", 1.0, "steps", {"prune_branch_layers": 0, "prune_max_reuse": 2}),
        ("branch 0: uniform every 4th step", 1.0, "steps", {"prune_branch_layers": 0, "prune_max_reuse": 3}),
        ("frames 0.012", 0.012, "frames", {}),
        ("frames 0.05", 0.05, "frames", {}),
        ("both 0.03", 0.03, "both", {}),
        ("both 0.03, motion-adaptive", 0.03, "both", {"prune_motion_adaptive": True}),
    ]
    for name, threshold, mode, extra in prune:
        extra = {"prune_branch_layers": None, **extra}  # rows without "branch 0": the whole first block
        rows.append(("pruning", name, {"prune_threshold": threshold, "prune_mode": mode, "extra": extra}))
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: mean and worst PSNR, mean SSIM, over all clips and split still / moving."""
    out = []
    for key in dict.fromkeys((r["group"], r["config"]) for r in rows):
        mine = [r for r in rows if (r["group"], r["config"]) == key]

        def mean(field: str, subset: list[dict[str, Any]]) -> float | None:
            values = [r[field] for r in subset if r[field] is not None]
            return float(np.mean(values)) if values else None

        still = [r for r in mine if r["motion"] == MotionClass.STILL.value]
        moving = [r for r in mine if r["motion"] != MotionClass.STILL.value]
        out.append({
            "group": key[0],
            "config": key[1],
            "clips": len(mine),
            "psnr_db_mean": mean("psnr_db", mine),
            "psnr_db_min": min((r["psnr_db"] for r in mine if r["psnr_db"] is not None), default=None),
            "ssim_mean": mean("ssim", mine),
            "identical_clips": sum(r["identical"] for r in mine),
            "psnr_db_still": mean("psnr_db", still),
            "psnr_db_moving": mean("psnr_db", moving),
            "pruned_fraction_mean": mean("pruned_fraction", mine),
            "pruned_fraction_still": mean("pruned_fraction", still),
            "pruned_fraction_moving": mean("pruned_fraction", moving),
            "speedup_estimate_mean": mean("speedup_estimate", mine),
        })
    return out


def _finite(value: float) -> float | None:
    return None if not np.isfinite(value) else round(value, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON path; a .md table is written next to it")
    parser.add_argument("--clips", type=int, default=10, help="held-out clips (one per motion class in turn)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="CPU, 2 clips of 4 frames at 64 px, 3 steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    info = demo_model_info()
    if not info.trained and not args.smoke:
        print(f"error: the demo model has no trained weights ({info.note}); this bench needs them", file=sys.stderr)
        return 2
    # Rounding weights is one-way (the engine refuses to widen them), so each precision mix gets its own copy.
    pipelines: dict[tuple[str, ...], Any] = {}

    def pipeline_for(settings: RunSettings) -> Any:
        key = tuple(Precision(getattr(settings, name)).value for name in ("unet_dtype", "vae_dtype", "encoder_dtype"))
        if key not in pipelines:
            pipelines[key] = build_demo_pipeline()
        return pipelines[key]
    spec = ClipSpec(num_frames=4, size=64) if args.smoke else ClipSpec()
    clips = held_out_clips(2 if args.smoke else args.clips, spec)
    steps = 3 if args.smoke else args.steps
    configs = configurations(cuda)
    if args.smoke:  # windows need more than 4 frames: keep one that fits
        configs = [c for c in configs if c[0] != "windows"] + [("windows", "windows 3, overlap 2", {"window_frames": 3, "overlap": 2})]

    rows: list[dict[str, Any]] = []
    for clip in clips:
        base = RunSettings.from_dict({
            "height": spec.size, "width": spec.size, "num_frames": spec.num_frames, "num_inference_steps": steps,
            "seed": clip.seed % 2**31, "motion_bucket_id": clip.motion_bucket_id, "device": device,
            "unet_dtype": "fp32",
        })
        image = PIL.Image.fromarray(clip.frames[0])
        reference = generate(pipeline_for(base), image, base).frames
        for group, name, changes in configs:
            settings = RunSettings.from_dict({**base.to_dict(), **changes})
            result = generate(pipeline_for(settings), image, settings)
            psnr, ssim = psnr_ssim(result.frames, reference)
            pruning = result.info.get("pruning", {})
            rows.append({
                "clip_seed": clip.seed, "motion": clip.motion.value, "motion_bucket_id": clip.motion_bucket_id,
                "group": group, "config": name, "psnr_db": _finite(psnr), "identical": bool(np.isinf(psnr)),
                "ssim": round(ssim, 5), "pruned_fraction": pruning.get("pruned_fraction"),
                "speedup_estimate": pruning.get("speedup_estimate"),
            })
        logger.info("clip %s (%s) done after %.0f s", clip.seed, clip.motion.value, time.perf_counter() - started)
        write_results(args, rows, info, device, spec, steps, started, clips)  # after every clip: a cut-off run keeps its rows
    return 0


def write_results(args, rows, info, device, spec, steps, started, clips_asked) -> None:
    summary = summarise(rows)
    env = collect_env()
    command = "python bench/demo_fidelity.py " + " ".join(sys.argv[1:])
    payload = {
        "env": env, "command": command, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "model": {"weights": info.note, "trained": info.trained},
        "clips": len({r["clip_seed"] for r in rows}), "clips_asked": len(clips_asked), "frames": spec.num_frames, "size": spec.size, "steps": steps,
        "reference": "the plain FP32 run of the same clip and seed",
        "seconds": time.perf_counter() - started, "summary": summary, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    table = markdown_table(summary)
    motions = ", ".join(dict.fromkeys(r["motion"] for r in rows))
    header = (
        f"# Fidelity on the trained demo model ({env.get('gpu') or device})\n\n`{command}`\n\n"
        f"{payload['clips']} of the {len(clips_asked)} held-out clips asked ({motions}), {spec.num_frames} frames at "
        f"{spec.size} px, {steps} steps (a run cut by its time limit keeps the clips it finished).\n\n"
    )
    args.out.with_suffix(".md").write_text(header + table, encoding="utf-8")
    print(table)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "PSNR / SSIM against the plain FP32 run of the same clip and seed; the mean PSNR leaves identical clips out.",
        "",
        "| group | setting | PSNR dB mean (min) | still / moving | SSIM | reused (still / moving) | est. speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        reused = (
            f"{s['pruned_fraction_mean']:.0%} ({_fmt(s['pruned_fraction_still'], '.0%')} / "
            f"{_fmt(s['pruned_fraction_moving'], '.0%')})" if s["pruned_fraction_mean"] is not None else "–"
        )
        psnr = (
            "identical" if s["identical_clips"] == s["clips"]
            else f"{_fmt(s['psnr_db_mean'], '.1f')} ({_fmt(s['psnr_db_min'], '.1f')})"
            + (f", {s['identical_clips']} identical" if s["identical_clips"] else "")
        )
        lines.append(
            f"| {s['group']} | {s['config']} | {psnr} | "
            f"{_fmt(s['psnr_db_still'], '.1f')} / {_fmt(s['psnr_db_moving'], '.1f')} | {s['ssim_mean']:.3f} | "
            f"{reused} | {_fmt(s['speedup_estimate_mean'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
