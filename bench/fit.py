"""``lowvram_studio.fit`` keeps a bare diffusers ``pipe(...)`` within its budget: metered from outside, per process.

    python bench/fit.py --out $OUT/fit.json            # H100: full-size SVD-XT, random weights
    python bench/fit.py --out /tmp/fit.json --smoke    # CPU check of this script: demo model

Each row is one child process that loads the model folder as a diffusers user does
(``StableVideoDiffusionPipeline.from_pretrained``, fp32 on the CPU), enters ``fit(pipe, budget=...)`` and
calls ``pipe(image, ...)`` itself; bench/budgets.py's NVML meter reads the child's GPU memory every few ms,
so the CUDA context and the decode count. The reference row is diffusers' own fp16 pipeline all on the
GPU with ``decode_chunk_size=8`` (the diffusers docs' example). Steps: 2 per row (the peak of a step does
not depend on the count). Partial results are rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.budgets import ChildMeter, build_model  # noqa: E402
from bench.common import device_run_arguments, new_report, write_report  # noqa: E402

CASES = {"B": (576, 1024, 25), "A": (512, 512, 24)}
SMOKE_CASES = {"B": (64, 128, 7), "A": (64, 64, 6)}
ROWS = (("diffusers fp16, all on GPU", None), ("fit 8GB", "8GB"), ("fit 6GB", "6GB"), ("fit 4GB", "4GB"))

CHILD = r"""
import json, sys, time, torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image
import lowvram_studio
model, budget, height, width, frames, steps, device = sys.argv[1:8]
height, width, frames, steps = int(height), int(width), int(frames), int(steps)
image = Image.new("RGB", (width, height), (120, 90, 200))
out = {}
if budget == "none":  # diffusers' own best plain fp16 run
    pipe = StableVideoDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float16).to(device)
    started = time.perf_counter()
    pipe(image, height=height, width=width, num_frames=frames, num_inference_steps=steps, decode_chunk_size=8,
         output_type="np")
else:
    pipe = StableVideoDiffusionPipeline.from_pretrained(model)
    with lowvram_studio.fit(pipe, budget=budget, height=height, width=width, num_frames=frames, device=device) as plan:
        out["plan"] = plan.reasons
        out["predicted_peak_gib"] = plan.predicted_peak_gib
        started = time.perf_counter()
        pipe(image, height=height, width=width, num_frames=frames, num_inference_steps=steps, output_type="np")
out["seconds"] = time.perf_counter() - started
if device == "cuda":
    out["torch_peak_mib"] = torch.cuda.max_memory_reserved() / 2**20
print("RESULT " + json.dumps(out))
"""


def run_row(name: str, budget: str | None, case: str, size: tuple[int, int, int], args: argparse.Namespace,
            meter: ChildMeter) -> dict[str, Any]:
    height, width, frames = size
    command = [sys.executable, "-c", CHILD, str(args.model_dir), budget or "none", str(height), str(width),
               str(frames), str(args.steps), "cpu" if args.smoke else "cuda"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    thread = meter.watch(child.pid)
    stdout, stderr = child.communicate()
    meter.stop(thread)
    row: dict[str, Any] = {"name": name, "case": case, "size": f"{width}x{height}x{frames}", "budget": budget,
                           "rc": child.returncode, "meter": meter.mode}
    result = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if result:
        row.update(json.loads(result[-1][len("RESULT "):]))
    else:
        lines = stderr.strip().splitlines() or ["no output"]
        row["error"] = lines[-1][:300]
        row["traceback_tail"] = lines[-12:]  # where it failed, for the JSON (the table keeps the last line)
    peak = max((value for _, value in meter.samples), default=None)
    row["process_peak_mib"] = peak
    if budget and peak is not None:
        limit = float(budget.removesuffix("GB")) * 1024
        row["within_budget"] = peak <= limit
    return row


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| case | row | process peak MiB | predicted GiB | within budget | s (2 steps + decode) | plan |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        peak = row.get("process_peak_mib")
        predicted = row.get("predicted_peak_gib")
        lines.append(f"| {row['size']} | {row['name']} | {'n/a' if peak is None else f'{peak:.0f}'} | "
                     f"{'' if predicted is None else f'{predicted:.2f}'} | {row.get('within_budget', '')} | "
                     f"{row.get('seconds', float('nan')):.1f} | {'; '.join(row.get('plan', [])) or row.get('error', '')} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    device_run_arguments(parser, "fit", steps=2)
    parser.add_argument("--cases", default="B,A")
    parser.add_argument("--budgets", default="none,8GB,6GB,4GB", help="which rows: 'none' is diffusers' own run")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    cases = SMOKE_CASES if args.smoke else CASES
    if args.smoke:
        from lowvram_studio.models.demo import build_demo_pipeline

        args.model_dir = Path("/tmp/fit-smoke-demo")  # never the full-size model's folder
        build_demo_pipeline().save_pretrained(args.model_dir)
    else:
        build_model(args.model_dir)
    meter = ChildMeter()
    report = new_report(rows=[])
    for case in args.cases.split(","):
        for name, budget in ROWS:
            if (budget or "none") not in args.budgets.split(","):
                continue
            if time.perf_counter() - started > args.deadline:
                break
            report["rows"].append(run_row(name, budget, case, cases[case], args, meter))
            write_report(args.out, "fit(): a bare diffusers pipe() within a budget", report, table(report["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
