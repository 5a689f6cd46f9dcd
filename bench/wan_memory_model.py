"""Fit the Wan memory model (plan/memory_model_wan.json) to bench/wan.py's measured rows, with leave-one-out errors.

    python bench/wan_memory_model.py bench/results/wan_20261207.json bench/results/wan_20261208.json

No GPU: it reads result files. Every row of ours that ran (rc 0) gives the phases whose own peak it
measured, as NVML saw them from outside: the caching allocator keeps what a phase freed, so a phase counts
only where it rose above every phase before it (by ``RISE_MIB``), and the encode phase only in the first row of a device
call (a fresh machine: the text encoder ran; the rows after it read the prompt cache, so no encoder
weights reached the GPU, which the memory model, planning for a new prompt, always counts; and not in a
streamed row measured before the encoder's memory was handed back, ``ENCODE_BEFORE_RELEASE``). A row whose
encoder did not run and whose weights all stay on the GPU (offload none) predicts weights it never held,
so it is not fitted; it is checked to be over-predicted (a safe plan). Writes the coefficients to
``--model-out`` and ``--out`` (JSON + markdown: each row's prediction when the fit left that row out, and the
plans the planner makes with the fitted model for the write-up's budgets on an Ampere card: predictions,
which bench/wan.py's budget rows measure on the GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_report  # noqa: E402
from lowvram_studio.engine.events import Phase  # noqa: E402
from lowvram_studio.models.wan_configs import UMT5_XXL, ti2v_5b_dims  # noqa: E402
from lowvram_studio.engine.precision import GpuInfo  # noqa: E402
from lowvram_studio.plan.budgets import PRESETS  # noqa: E402
from lowvram_studio.plan.memory_model import MEMORY_MODEL_PATHS, PHASES, MemoryModel, calibrate  # noqa: E402
from lowvram_studio.plan.planner import Planner  # noqa: E402
from lowvram_studio.settings import OffloadMode, RunSettings  # noqa: E402

CONTEXT_MIB = 600.0  # the CUDA context the memory model assumes on the H100 (plan/memory_model.json)
# Streamed rows of these files ran before the encoder's memory was handed back after the text encoding
# (engine/wan.py, WanFamily.encode): their encode phase held the encoder's and the VAE's weights at once
ENCODE_BEFORE_RELEASE = {"wan_20261207.json"}
# ... and, offloaded, moved the VAE whole (now its encoder and decoder halves apart) and streamed UMT5's input
# embedding (now looked up on the CPU; engine/placement.py), and held the decoded clip on the GPU (now its frames
# move to the CPU as they are made; engine/wan.py): their rows are fitted with what they held
BEFORE_HALVES = {"wan_20261207.json"}
RISE_MIB = 256.0  # a phase above the ones before it by less is within the meter's noise: not its own peak
WITHIN = 0.15  # the memory model's promise: leave-one-out errors within +/-15 %
# A start for the fit, from the 480p / 720p rows of bench/results/wan_20261207.md by hand; the fit moves every
# coefficient the rows constrain and the small pull towards these keeps the others (e.g. stream_extra_mib)
FIXED = ("weights",)  # the resident weights' bytes are counted, not fitted
PRIOR = {"overhead_mib": 300.0, "weights": 1.0, "vae_encode": 400.0, "dit_tokens": 60_000.0, "dit_ff": 20_000.0,
         "stream_extra_mib": 300.0, "vae_decode": 1500.0, "decode_output": 4.0}


def measured_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """Rows of ours that ran, each with the phases it measured (see the module docstring) or a check only."""
    rows = []
    for path in paths:
        seen_calls: set[str] = set()
        for row in json.loads(path.read_text(encoding="utf-8"))["rows"]:
            if "ran" not in row or row.get("rc") != 0:
                continue
            call = f"{path.name}:{row.get('device_call', 'call 1')}"
            encoder_ran = call not in seen_calls
            seen_calls.add(call)
            settings = RunSettings.from_dict_lenient(row["ran"])[0]
            peaks = row["phase_peaks_mib"]
            own: dict[str, float] = {}
            highest = 0.0
            for phase in PHASES:
                value = float(peaks[phase.value])
                if value > highest + RISE_MIB and (phase != Phase.ENCODE or encoder_ran):
                    own[phase.value] = value
                highest = max(highest, value)
            if path.name in ENCODE_BEFORE_RELEASE and settings.offload == OffloadMode.STREAM:
                own.pop(Phase.ENCODE.value, None)
            fitted = encoder_ran or settings.offload != OffloadMode.NONE
            dims = ti2v_5b_dims()
            if path.name in BEFORE_HALVES:
                dims = replace(dims, vae_encode_params=0, decode_to_host=False,
                               encoder_stream_params=UMT5_XXL["vocab_size"] * UMT5_XXL["d_model"])
            rows.append({"name": f"{row['name']} ({path.name})", "settings": settings, "dims": dims,
                         "context_mib": CONTEXT_MIB, "process_peak_mib": float(row["process_peak_mib"]),
                         "phase_peaks_mib": own if fitted else {}, "fitted": fitted, "encoder_ran": encoder_ran})
    return rows


def leave_one_out(rows: list[dict[str, Any]], prior: MemoryModel, full: MemoryModel) -> list[dict[str, Any]]:
    """Each fitted row predicted by the model fitted on all the other rows; unfitted rows by the ``full`` fit."""
    results = []
    for index, row in enumerate(rows):
        others = [r for i, r in enumerate(rows) if i != index and r["fitted"]]
        model = calibrate(others, prior, fixed=FIXED) if row["fitted"] else full
        phases = model.predict(row["dims"], row["settings"], CONTEXT_MIB).phases
        peak = max(phases.values())
        errors = {phase: round(phases[phase] / mib - 1, 3) for phase, mib in row["phase_peaks_mib"].items()}
        results.append({"name": row["name"], "fitted": row["fitted"], "encoder_ran": row["encoder_ran"],
                        "measured_peak_mib": row["process_peak_mib"], "predicted_peak_mib": round(peak, 1),
                        "peak_error": round(peak / row["process_peak_mib"] - 1, 3),
                        "measured_phases_mib": row["phase_peaks_mib"],
                        "predicted_phases_mib": {k: round(v, 1) for k, v in phases.items()}, "phase_errors": errors})
    return results


PLAN_CARD = GpuInfo("NVIDIA GeForce RTX 3060", (8, 6))  # an Ampere card: bf16, the fp16 compute path
PLAN_CASES = {"480p": (480, 832, 81), "720p": (704, 1280, 121)}
PLAN_BUDGETS = ("24GB", "12GB", "8GB", "6GB", "4GB")
PLANNED = ("offload", "cfg_split", "ff_chunk", "vae_tile", "vae_dtype", "window_frames", "unet_dtype", "interpolate",
           "num_frames")


def plans(model: MemoryModel) -> list[dict[str, Any]]:
    """What the planner makes of each budget with ``model``, from the CLI's defaults for a Wan prompt."""
    planner = Planner.for_gpu(ti2v_5b_dims(), PLAN_CARD, model=model)
    rows = []
    for case, (height, width, frames) in PLAN_CASES.items():
        request = RunSettings(height=height, width=width, num_frames=frames, device="cuda", prompt="a red ball",
                              guidance_scale=5.0, encoder_dtype="auto")
        for budget in PLAN_BUDGETS:
            plan = planner.plan(request, PRESETS[budget])
            changed = {name: getattr(plan.settings, name) for name in PLANNED
                       if getattr(plan.settings, name) != getattr(request, name)}
            rows.append({"case": case, "budget": budget, "fits": plan.fits,
                         "predicted_peak_mib": round(plan.prediction.peak_mib), "peak_phase": plan.prediction.peak_phase,
                         "settings": {k: getattr(v, "value", v) for k, v in changed.items()}})
    return rows


def plans_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"Plans with this model for TI2V-5B on an Ampere card ({PLAN_CARD.name}; predictions, not measurements):",
             "", "| case | budget | fits | predicted peak MiB (phase) | settings the plan changed |", "|---|---|---|---|---|"]
    for r in rows:
        changed = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "none"
        lines.append(f"| {r['case']} | {r['budget']} | {r['fits']} | {r['predicted_peak_mib']} ({r['peak_phase']}) | "
                     f"{changed} |")
    return lines


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| row | measured peak MiB | predicted (left out) MiB | error | phases measured: error |",
             "|---|---|---|---|---|"]
    for r in results:
        phases = ", ".join(f"{p} {e:+.0%}" for p, e in r["phase_errors"].items()) or (
            "not fitted: no encoder ran, weights all resident (a check: predicted must be higher)")
        lines.append(f"| {r['name']} | {r['measured_peak_mib']:.0f} | {r['predicted_peak_mib']:.0f} | "
                     f"{r['peak_error']:+.1%} | {phases} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="bench/wan.py result JSON files")
    parser.add_argument("--out", type=Path, default=Path(f"bench/results/wan_memory_model_{time.strftime('%Y%m%d')}.json"))
    parser.add_argument("--model-out", type=Path, default=MEMORY_MODEL_PATHS["wan"])
    args = parser.parse_args()
    rows = measured_rows(args.results)
    prior = MemoryModel(dict(PRIOR), {"cpu": 0.0, "cuda": CONTEXT_MIB})
    model = calibrate([r for r in rows if r["fitted"]], prior, fixed=FIXED)
    results = leave_one_out(rows, prior, model)
    fitted = [r for r in results if r["fitted"]]
    within = sum(abs(r["peak_error"]) <= WITHIN for r in fitted)
    safe = all(r["peak_error"] >= 0 for r in results if not r["fitted"])
    files = ", ".join(path.name for path in args.results)
    model.source = (f"calibrated on the {len(fitted)} measured rows of {files} (H100, Wan2.2 TI2V-5B, bf16, VAE fp32) "
                    f"by bench/wan_memory_model.py; leave-one-out {within}/{len(fitted)} peaks within {WITHIN:.0%}")
    model.save(args.model_out)
    source = json.loads(args.results[-1].read_text(encoding="utf-8"))
    planned = plans(model)
    report = {"env": source.get("env", {}), "command": "python " + " ".join(sys.argv), "inputs": files,
              "coefficients": model.coefficients, "within": f"{within}/{len(fitted)}", "unfitted_over_predicted": safe,
              "rows": results, "plans": planned}
    write_report(args.out, "The Wan memory model: leave-one-out errors", report, [
        *table(results), "",
        f"Leave-one-out: {within}/{len(fitted)} fitted rows' peaks within {WITHIN:.0%}; rows not fitted over-predicted: "
        f"{safe}. GPU and versions above are those of the last input file's rows; this script ran on no GPU.", "",
        *plans_table(planned)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
