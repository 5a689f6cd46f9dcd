"""GPU proof of compare: FP32 original vs FP16 only vs FP16 + optimizations on full-size SVD-XT.

    python bench/compare.py --out $OUT/compare.json          # H100: 512x512x14, 4 steps
    python bench/compare.py --out /tmp/cmp --smoke           # CPU: demo model, 64x64x4, 2 steps

Builds the SVD-XT architecture with random weights (seed 0) in fp32 on the GPU, runs
``lowvram_studio.compare.run_compare`` on it and writes, next to ``--out``:
``compare_<yyyymmdd>.json`` (DESIGN §7 bench rows), ``.md`` (the same rows) and ``.png`` (the curves),
plus the full compare folder ``compare_<yyyymmdd>_run/`` (compare.json with every sample, table.md).
Expect the FP32 process peak about twice the FP16 one in the denoise phase.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lowvram_studio.compare import CompareResult, run_compare  # noqa: E402
from lowvram_studio.models.load import LoadedModel, load_model  # noqa: E402
from lowvram_studio.monitor.record import RunRecord  # noqa: E402
from lowvram_studio.monitor.report import memory_figure  # noqa: E402
from lowvram_studio.monitor.vram import MonitorConfig, measure_idle_baseline  # noqa: E402
from lowvram_studio.settings import RunSettings  # noqa: E402

LOG = logging.getLogger("bench.compare")
CONFIG_NAMES = {"FP32 original": "fp32-original", "FP16 only": "fp16-only", "FP16 + chosen optimizations": "fp16-optimized"}
ROW_COLUMNS = (
    "case", "config", "steps", "process_peak_mib", "torch_peak_mib", "device_peak_mib", "ram_peak_mib",
    "denoise_peak_mib", "decode_peak_mib", "peak_vs_fp16", "seconds_per_step", "ratio_vs_fp16", "seconds_total",
    "output_fps", "psnr_db", "ssim", "process_figure", "monitor_cpu_fraction", "samples", "error",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="a folder, or NAME.json whose folder and stem are used")
    parser.add_argument("--size", type=int, default=512, help="height = width in pixels (multiple of 64)")
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--optimized",
        default='{"cfg_split": true, "decode_frames": 2}',
        help="RunSettings fields (JSON) of run (c), on top of FP16 UNet",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: demo model, 64x64x4, 2 steps")
    return parser.parse_args()


def synthetic_image(size: int) -> Image.Image:
    """A deterministic picture (gradient and a disc): the weights are random, the input need not be real."""
    y, x = np.mgrid[0:size, 0:size] / size
    disc = ((x - 0.6) ** 2 + (y - 0.45) ** 2 < 0.05).astype(float)
    rgb = np.stack([x, y, 0.5 * (1 - x) + 0.5 * disc], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def build_model(smoke: bool) -> LoadedModel:
    """The demo model (--smoke) or full-size SVD-XT with random weights, fp32 on the GPU."""
    if smoke:
        return load_model("demo")
    from lowvram_studio.models.svd_configs import build_svd_xt_pipeline

    pipeline = build_svd_xt_pipeline(dtype=torch.float32, device="cuda", seed=0)
    return LoadedModel(pipeline, name="svd-xt-architecture", source="svd_configs, random weights seed 0", kind="config")


def bench_rows(result: CompareResult, case: str, steps: int) -> list[dict]:
    by_label = {r.label: r for r in result.records}
    fp16 = by_label.get("FP16 only")
    memory_key, _ = memory_figure(result.records)
    rows = []
    for record in result.records:
        r = record.results
        phases = record.phase_peaks()
        rows.append(
            {
                "case": case,
                "config": CONFIG_NAMES.get(record.label, record.label),
                "steps": steps,
                "process_peak_mib": r["process_peak_mib"],
                "torch_peak_mib": r["torch_peak_mib"],
                "device_peak_mib": r["device_peak_mib"],
                "ram_peak_mib": r["ram_peak_mib"],
                "denoise_peak_mib": phases.get("denoise"),
                "decode_peak_mib": phases.get("decode"),
                "peak_vs_fp16": _ratio(r[memory_key], fp16, memory_key),
                "seconds_per_step": r["seconds_per_step"],
                "ratio_vs_fp16": _ratio(r["seconds_per_step"], fp16, "seconds_per_step"),
                "seconds_total": r["seconds_total"],
                "output_fps": r["output_fps"],
                "psnr_db": r["psnr_db"],
                "ssim": r["ssim"],
                "process_figure": _process_figure_source(record),
                "monitor_cpu_fraction": record.monitor.get("cpu_fraction"),
                "samples": len(record.samples),
                "error": record.error,
            }
        )
    return rows


def _process_figure_source(record: RunRecord) -> str | None:
    """Where the process peak came from: the driver's per-process list, or device used minus others."""
    if any(s.process_used_mib is not None for s in record.samples):
        return "nvml-process"
    return "device-minus-baseline" if record.results["process_peak_mib"] is not None else None


def _ratio(value: float | None, reference: RunRecord | None, key: str) -> float | None:
    if value is None or reference is None or not reference.results[key]:
        return None
    return value / reference.results[key]


def _divide(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def rows_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(ROW_COLUMNS) + " |", "|" + "---|" * len(ROW_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in ROW_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    if args.smoke:
        args.size, args.frames, args.steps = 64, 4, 2
    elif not torch.cuda.is_available():
        print("error: no CUDA GPU; run on the GPU machine or add --smoke for a CPU check", file=sys.stderr)
        return 2
    out_dir, stem = (args.out.parent, args.out.stem) if args.out.suffix == ".json" else (args.out, None)
    stem = stem or f"compare_{datetime.date.today():%Y%m%d}"
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    # before CUDA is initialised: what other processes use, for the process-peak fallback
    device_baseline = measure_idle_baseline().device_used_mib
    model = build_model(args.smoke)
    LOG.info("model built in %.1f s", time.perf_counter() - started)
    settings = RunSettings.from_dict(
        {
            "height": args.size, "width": args.size, "num_frames": args.frames, "num_inference_steps": args.steps,
            "seed": 0, "device": "cpu" if args.smoke else "cuda", **json.loads(args.optimized),
        }
    )
    result = run_compare(
        model, synthetic_image(args.size), settings, out_dir / f"{stem}_run",
        monitor_config=MonitorConfig(device_baseline_mib=device_baseline),
    )

    case = f"{args.size}x{args.size}x{args.frames}"
    rows = bench_rows(result, case, args.steps)
    env = result.records[0].env
    data = {"env": env, "command": " ".join(sys.argv), "notes": result.notes, "rows": rows}
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    table = rows_markdown(rows)
    (out_dir / f"{stem}.md").write_text(f"# compare {case}, {args.steps} steps, {env.get('gpu') or 'CPU'}\n\n"
                                         f"{table}\n{result.table_md}", encoding="utf-8")
    shutil.copyfile(result.files["png"], out_dir / f"{stem}.png")

    print(result.table_md)
    print(table)
    _, name = memory_figure(result.records)
    fp32_row = rows[0]
    print(f"FP32 / FP16 {name}: {_cell(fp32_row['peak_vs_fp16'])}x (denoise phase: "
          f"{_cell(_divide(rows[0]['denoise_peak_mib'], rows[1]['denoise_peak_mib']))}x); "
          f"FP16 PSNR vs FP32: {_cell(rows[1]['psnr_db'])} dB")
    print(f"written: {out_dir}/{stem}.{{json,md,png}} and {result.out_dir}/; total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
