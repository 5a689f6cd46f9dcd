"""Wan2.2 TI2V-5B on the GPU, metered from outside: diffusers' own bf16 pipeline beside our CLI's techniques.

    python bench/wan.py --out $OUT/wan.json                 # H100: full-size TI2V-5B, random weights
    python bench/wan.py --out /tmp/wan.json --smoke         # CPU check of this script: the toy Wan model

The full-size model (models/wan_configs: transformer and UMT5-XXL in bf16, the Wan2.2 VAE in fp32, as
Wan-AI ships them; random weights) is written once into ``--model-dir``. Every row is one child process
sampled by bench/budgets.py's NVML meter, split into phases by the run record's event times. The first of
our rows encodes the prompts and fills the prompt-embedding cache (so its encode phase is a first run's);
the rows after it read the embeddings from the cache, as a user's second run does, and the last row asks
for a new prompt under weight streaming. The reference is diffusers' documented TI2V-5B recipe: the
pipeline in bf16 with the VAE in fp32, all on the GPU. Steps: 2 per row (a step's peak does not depend on
the count). Partial results are rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.budgets import PHASE_COLUMNS, ChildMeter, run_metered, run_row, write_input_image  # noqa: E402
from bench.common import device_run_arguments, write_report  # noqa: E402
from lowvram_studio.plan.budgets import budget_for  # noqa: E402
from lowvram_studio.plan.memory_model import MemoryModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {"480p": (480, 832, 81), "720p": (704, 1280, 121)}
SMOKE_CASES = {"480p": (64, 64, 9), "720p": (64, 128, 9)}
PROMPT = ["--prompt", "a red ball moves left slowly", "--negative-prompt", "still scene"]
NEW_PROMPT = ["--prompt", "a blue box spins fast", "--negative-prompt", "still scene"]
LEAN = ["--offload", "stream", "--cfg-split", "--ff-chunk", "4096"]
ROWS: list[tuple[str, str, list[str]]] = [  # (name, case, our CLI flags); "diffusers" rows: the reference
    ("480p diffusers bf16 (all on GPU)", "480p", []),
    ("480p ours default", "480p", PROMPT),
    ("480p ours stream + cfg-split + ff-chunk", "480p", [*PROMPT, *LEAN]),
    ("720p ours stream + cfg-split + ff-chunk", "720p", [*PROMPT, *LEAN]),
    ("480p ours offload stream", "480p", [*PROMPT, "--offload", "stream"]),
    ("480p ours fp8 + stream + cfg-split + ff-chunk", "480p", [*PROMPT, *LEAN, "--unet-dtype", "fp8"]),
    ("480p ours offload model", "480p", [*PROMPT, "--offload", "model"]),
    ("480p ours lean + vae tile 256", "480p", [*PROMPT, *LEAN, "--vae-tile", "256"]),
    ("720p ours lean + vae tile 256", "720p", [*PROMPT, *LEAN, "--vae-tile", "256"]),
    ("720p ours default", "720p", PROMPT),
    ("720p diffusers bf16 (all on GPU)", "720p", []),
    ("480p ours stream, new prompt (encoder runs)", "480p", [*NEW_PROMPT, "--offload", "stream"]),
    # the promise: our planner, with the Wan memory model (plan/memory_model_wan.json), picks the settings
    ("480p ours budget 8GB", "480p", [*PROMPT, "--vram-budget", "8GB"]),
    ("480p ours budget 6GB", "480p", [*PROMPT, "--vram-budget", "6GB"]),
    ("480p ours budget 12GB", "480p", [*PROMPT, "--vram-budget", "12GB"]),
    ("720p ours budget 12GB", "720p", [*PROMPT, "--vram-budget", "12GB"]),
    ("720p ours budget 16GB", "720p", [*PROMPT, "--vram-budget", "16GB"]),
    # issue #19's anchors: a 6 GB card completes 704x1280x121; a 4 GB one 480p (both predicted to fit since the VAE
    # moves in halves, UMT5's table stays on the CPU and decoded frames leave the GPU)
    ("720p ours budget 6GB", "720p", [*PROMPT, "--vram-budget", "6GB"]),
    ("480p ours budget 4GB", "480p", [*PROMPT, "--vram-budget", "4GB"]),
    ("720p ours budget 4GB", "720p", [*PROMPT, "--vram-budget", "4GB"]),
]

REFERENCE = r"""
import json, sys, time, torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
from PIL import Image
model, height, width, frames, steps, device = sys.argv[1:7]
height, width, frames, steps = int(height), int(width), int(frames), int(steps)
vae = AutoencoderKLWan.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
pipe = WanImageToVideoPipeline.from_pretrained(model, vae=vae, torch_dtype=torch.bfloat16).to(device)
image = Image.new("RGB", (width, height), (40, 90, 160))
started = time.perf_counter()
pipe(image=image, prompt="a red ball moves left slowly", negative_prompt="still scene", height=height, width=width,
     num_frames=frames, num_inference_steps=steps, output_type="np")
out = {"seconds": time.perf_counter() - started}
if device == "cuda":
    out["torch_peak_mib"] = torch.cuda.max_memory_reserved() / 2**20
print("RESULT " + json.dumps(out))
"""


def reference_row(name: str, case: str, args: argparse.Namespace, meter: ChildMeter, cases: dict) -> dict[str, Any]:
    height, width, frames = cases[case]
    command = [sys.executable, "-c", REFERENCE, args.model, str(height), str(width), str(frames), str(args.steps),
               "cpu" if args.smoke else "cuda"]
    returncode, output, seconds = run_metered(command, meter, args.row_timeout)
    row: dict[str, Any] = {"name": name, "case": case, "rc": returncode, "meter": meter.mode,
                           "seconds_total": round(seconds, 1)}
    result = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if result:
        row.update(json.loads(result[-1][len("RESULT "):]))
        row["seconds_per_step"] = None  # its one timer spans the steps and the decode
    else:
        row["output_tail"] = output[-2000:]
    row["process_peak_mib"] = round(max(mib for _, mib in meter.samples), 1) if meter.samples else None
    print(f"{name}: rc {returncode}, peak {row['process_peak_mib']} MiB", flush=True)
    return row


def build_model(model_dir: Path) -> None:
    """Write the full-size model in a child on the GPU (random init there takes seconds, not minutes)."""
    if (model_dir / "model_index.json").exists():
        return
    code = ("import sys; from lowvram_studio.models.wan_configs import build_ti2v_5b_pipeline; "
            "build_ti2v_5b_pipeline('cuda').save_pretrained(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(model_dir)], check=True, cwd=ROOT)


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| row | rc | process peak MiB | per phase (encode / denoise / decode / export) | s/step | s total | "
             "budget: predicted MiB, within |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        phases = r.get("phase_peaks_mib", {})
        per_phase = " / ".join(str(phases.get(p, "-")) for p in PHASE_COLUMNS)
        step = r.get("seconds_per_step")
        budget = "" if r.get("budget") is None else (
            f"{r.get('predicted_peak_mib')} of {r.get('available_mib')} usable, {r.get('within_budget')}")
        lines.append(f"| {r['name']} | {r.get('rc', r.get('skipped'))} | {r.get('process_peak_mib')} | {per_phase} | "
                     f"{'-' if step is None else f'{step:.2f}'} | {r.get('seconds_total', '-')} | {budget} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    device_run_arguments(parser, "wan", steps=2, model_dir="/tmp/wan2.2-ti2v-5b-random")
    parser.add_argument("--row-timeout", type=float, default=240.0)
    parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: the toy Wan model")
    args = parser.parse_args()
    begun = time.perf_counter()
    cases = SMOKE_CASES if args.smoke else CASES
    if args.smoke:
        from lowvram_studio.models.wan_toy import build_toy_wan_pipeline

        args.model_dir = Path("/tmp/wan-bench-smoke")  # never the full-size model's folder
        build_toy_wan_pipeline().save_pretrained(args.model_dir)
    else:
        build_model(args.model_dir)
    args.model = str(args.model_dir)
    built = round(time.perf_counter() - begun, 1)
    image = write_input_image(args.out.parent / "wan_input.png", (1280, 704))
    meter = ChildMeter()
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    rows: list[dict[str, Any]] = []
    for name, case, flags in ROWS:
        if wanted and name not in wanted:
            continue
        if time.perf_counter() - begun > args.deadline:
            rows.append({"name": name, "case": case, "skipped": "deadline"})
        elif "diffusers" in name:
            rows.append(reference_row(name, case, args, meter, cases))
        else:
            budget = flags[flags.index("--vram-budget") + 1] if "--vram-budget" in flags else None
            available = {} if budget is None else {budget: budget_for(budget, MemoryModel.for_kind("wan")).available_mib}
            rows.append(run_row({"name": name, "case": case, "flags": flags, "budget": budget}, args, meter, cases,
                                image, available))
        env = next((r["env"] for r in rows if r.get("env")), {})  # the child's stamp: this process stays off CUDA
        report = {"env": env, "command": "python " + " ".join(sys.argv), "steps": args.steps, "cases": cases,
                  "model": "toy Wan" if args.smoke else "Wan2.2 TI2V-5B architecture, random weights (seed 0)",
                  "build_seconds": built, "rows": rows}
        write_report(args.out, "Wan2.2 TI2V-5B on the GPU, metered from outside", report, table(rows))  # partial
        # results survive a call cut off by its time limit
    return 0 if all(r.get("rc", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
