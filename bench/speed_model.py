"""Does the speed model (engine/speed_model.py) predict s/step on a real card? Predicted vs measured per configuration.

    python bench/speed_model.py --out $OUT/speed.json --model-dir /tmp/svdxt --deadline 500   # H100
    python bench/speed_model.py --smoke --out /tmp/speed.json                                 # CPU check: demo model

Full-size SVD-XT architecture with random weights (seed 0), written once into ``--model-dir`` as budgets.py
writes it, loaded once (fp16 weights) and run in this process by the engine (``sampler.generate``) for
every configuration: UNet fp16 storage computing in fp16 or fp32 (``half_compute``: the fp32 rows up-cast
each layer), CFG batched or split, offload none / model / stream, at cases A 512x512x24 and B 576x1024x25
(bench/planner.py's). The fp16-compute rows run first: layerwise casting cannot be taken off a UNet.
Each run takes ``--steps`` steps; measured s/step is the mean of steps 2..N from the run's step events
(step 1 holds cuDNN's algorithm search and the first weight moves). Predicted s/step is
``CardSpeed.step_seconds`` for this card's class (the smoke run predicts as an H100: its ratios only check
the script). A row passes when measured / predicted is within 0.75..1.25. Rows are written after every
run, so a call cut short keeps them; no row starts after ``--deadline`` seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.budgets import CASES, SMOKE_CASES, build_model  # noqa: E402
from bench.common import device_run_arguments, new_report, write_report  # noqa: E402
from lowvram_studio.settings_adapter import generate, step_config  # noqa: E402
from lowvram_studio.engine.speed_model import CardSpeed, steady_seconds_per_step  # noqa: E402
from lowvram_studio.media import fit_image  # noqa: E402
from lowvram_studio.models.load import load_model  # noqa: E402
from lowvram_studio.settings import RunSettings  # noqa: E402

TOLERANCE = 0.25
PLACEMENTS = ((False, "none"), (True, "none"), (True, "model"), (True, "stream"), (False, "stream"))
SMOKE_GPU = "NVIDIA H100 80GB HBM3"


def rows_to_run(smoke: bool) -> list[dict[str, Any]]:
    """fp16-compute rows first (see the module docstring), then fp32; each case x CFG x offload."""
    rows = [{"name": f"{case} {compute}-compute {'split' if split else 'batched'} {offload}", "case": case,
             "half_compute": compute, "cfg_split": split, "offload": offload}
            for compute in ("fp16", "fp32") for case in ("A", "B") for split, offload in PLACEMENTS]
    return rows[::4] if smoke else rows  # the smoke run: one row of each placement, both computes


def run_row(row: dict[str, Any], pipeline: Any, card: CardSpeed, image: Any, args: argparse.Namespace,
            cases: dict[str, tuple[int, int, int]]) -> dict[str, Any]:
    height, width, frames = cases[row["case"]]
    settings = RunSettings(height=height, width=width, num_frames=frames, num_inference_steps=args.steps, seed=0,
                           device="cpu" if args.smoke else "cuda", unet_dtype="fp16",
                           half_compute=row["half_compute"], cfg_split=row["cfg_split"], offload=row["offload"],
                           decode_frames=4)
    step = step_config(settings, card.gpu.info)
    predicted = card.step_seconds(step)
    out: dict[str, Any] = {**row, "steps": args.steps, "predicted_s_per_step": round(predicted, 4),
                           "predicted_streaming_overhead": round(card.streaming_overhead(step), 3),
                           "compute": step.compute}
    started = time.perf_counter()
    try:
        result = generate(pipeline, fit_image(image, width, height), settings)
    except (RuntimeError, ValueError) as error:  # out of memory, a precision the card refuses: the row says so
        out["error"] = f"{type(error).__name__}: {error}"[:500]
        return out
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    measured = steady_seconds_per_step(result.events)
    out.update(seconds_total=round(time.perf_counter() - started, 1), execution_path=result.info.get("execution_path"),
               seconds_per_step=None if measured is None else round(measured, 4))
    if measured is not None:
        out["ratio"] = round(measured / predicted, 3)
        out["within_tolerance"] = abs(out["ratio"] - 1.0) <= TOLERANCE
    return out


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| row | compute | predicted s/step | measured s/step | measured / predicted | within +/-25 % | "
             "predicted streaming overhead |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        within = {True: "yes", False: "**no**", None: r.get("skipped") or r.get("error", "-")[:60]}
        lines.append(f"| {r['name']} | {r.get('compute', '-')} | {r.get('predicted_s_per_step', '-')} | "
                     f"{r.get('seconds_per_step', '-')} | {r.get('ratio', '-')} | {within[r.get('within_tolerance')]} | "
                     f"{r.get('predicted_streaming_overhead', '-')} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    device_run_arguments(parser, "speed_model", steps=3)
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: demo model, tiny sizes")
    args = parser.parse_args()
    begun = time.perf_counter()
    if args.smoke:
        loaded, cases, gpu_name = load_model("demo"), SMOKE_CASES, SMOKE_GPU
    else:
        build_model(args.model_dir)
        loaded, cases, gpu_name = load_model(args.model_dir, dtype=torch.float16), CASES, torch.cuda.get_device_name(0)
    pipeline = loaded.pipeline
    card, known = CardSpeed.for_gpu(pipeline.unet.config, gpu_name)
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1024, 576), (40, 90, 160))
    ImageDraw.Draw(image).ellipse((380, 160, 640, 420), fill=(230, 200, 40))
    report = new_report(steps=args.steps, cases=cases, gpu_class=card.gpu.name, gpu_known=known,
                        model="demo" if args.smoke else "SVD-XT architecture, random weights (seed 0), fp16 folder",
                        tolerance=TOLERANCE, rows=[])
    rows = report["rows"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for row in rows_to_run(args.smoke):
        if time.perf_counter() - begun > args.deadline:
            rows.append({**row, "skipped": "deadline"})
            continue
        rows.append(run_row(row, pipeline, card, image, args, cases))
        print(f"{row['name']}: predicted {rows[-1].get('predicted_s_per_step')}, measured "
              f"{rows[-1].get('seconds_per_step')} s/step, ratio {rows[-1].get('ratio')}", flush=True)
        measured = [r for r in rows if "ratio" in r]
        report["within_tolerance"] = f"{sum(r['within_tolerance'] for r in measured)} of {len(measured)}"
        args.out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")  # partial results survive
    write_report(args.out, f"Speed model: predicted vs measured s/step on {card.gpu.name}", report, table(rows))
    return 0 if all(r.get("within_tolerance", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
