"""GPU proof of the planner: predicted vs measured process peak, small-card caps, long clips, OOM re-plan.

    python bench/planner.py --out $OUT/planner.json      # H100: full-size SVD-XT, random weights, fp16, 2 steps
    python bench/planner.py --out /tmp/planner --smoke   # CPU check of this script: demo model, tiny sizes, 1 step

Every row runs once through ``planned_run`` (``plan_run`` + ``execute``: re-planned after an OOM) and
measures its process peak (NVML per-process, or device used minus the idle baseline when the container
hides PIDs; never below context + torch's reserved peak, which is what the GPU must hold) from the start of encode to the end of decode: when
the load phase has placed the weights, cached blocks are returned to the driver, so weights an
earlier row left on the GPU do not count. Runs take 2 denoising steps: the peak of a step does
not depend on how many steps follow, so memory figures equal those of 25-step runs (times do not).
Rows:

* 14 unconstrained configurations over cases A 512x512x24, B 576x1024x25, C 512x512x96 varying CFG split,
  chunking, decode chunk, tiles, offload and temporal windows: predicted (committed memory_model.json,
  with the measured context) vs measured, target +/-15 %;
* case B planned for the 6 GB and 4 GB presets and run under a simulated card (allocator capped at the
  preset minus a small card's context): must complete;
* case A planned for the 6 GB preset under its cap (the write-up's GTX 1060 ran 24 frames of 512x512);
* the OOM re-plan for real: case B starts from the 8 GB plan under the 4 GiB cap and must re-plan;
* the planner's choices for the write-up's table (6 GB 24 frames, 12 GB 32 / 48, 24 GB 64), predicted only;
* checks: C peaks at <= 1.1x its A twin (same settings, windows of 24), seam ratios of windowed rows.

The measured rows re-fit the memory model (``calibrate``); the fit is written next to the results
(``*_memory_model.json``; the lead copies it to lowvram_studio/engine/memory_model.json) with its
leave-one-out error, so the committed coefficients can be judged on rows they were not fitted to.
The caching allocator runs with ``expandable_segments:True`` (``--alloc-conf``) unless the environment
sets PYTORCH_CUDA_ALLOC_CONF: without it, fragmentation in the VAE decode makes peaks depend on history.
Writes ``<out>.json`` (DESIGN §7 rows plus ``checks``), ``<out>.md`` and prints the table last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lowvram_studio.engine.events import Phase  # noqa: E402
from lowvram_studio.engine.oom import OutOfMemoryAfterRetries  # noqa: E402
from lowvram_studio.engine.dims import ModelDims  # noqa: E402
from lowvram_studio.plan.budgets import PRESETS, simulated_budget  # noqa: E402
from lowvram_studio.plan.memory_model import MIB, MemoryModel, calibrate  # noqa: E402
from lowvram_studio.plan.planner import Planner  # noqa: E402
from lowvram_studio.models.load import LoadedModel  # noqa: E402
from lowvram_studio.planned_run import execute, plan_run  # noqa: E402
from lowvram_studio.settings import RunSettings  # noqa: E402

LOG = logging.getLogger("bench.planner")
TOLERANCE = 0.15
CASES = {"A": (512, 512, 24), "B": (576, 1024, 25), "C": (512, 512, 96)}
SMOKE_CASES = {"A": (64, 64, 6), "B": (64, 128, 7), "C": (64, 64, 30)}
FP16 = {"unet_dtype": "fp16", "vae_dtype": "fp16", "encoder_dtype": "fp16"}

# (name, case, RunSettings changes). "A-twin" and "C-windows" differ only in frames and windows.
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("plain", "A", {}),
    ("cfg-split+decode8", "A", {"cfg_split": True, "decode_frames": 8}),
    ("A-twin", "A", {"cfg_split": True, "ff_chunk": 16384, "decode_frames": 4}),
    ("all-chunks+decode2", "A", {"cfg_split": True, "spatial_chunk": 4, "temporal_chunk": 2048, "ff_chunk": 4096,
                                 "decode_frames": 2}),
    ("offload-model+decode2", "A", {"offload": "model", "cfg_split": True, "decode_frames": 2}),
    ("offload-stream+decode2", "A", {"offload": "stream", "cfg_split": True, "ff_chunk": 16384, "decode_frames": 2}),
    ("windows8+decode4", "A", {"cfg_split": True, "window_frames": 8, "overlap": 2, "decode_frames": 4}),
    ("tile256+decode8", "A", {"cfg_split": True, "vae_tile": 256, "decode_frames": 8}),
    ("plain", "B", {}),
    ("cfg-split+decode4", "B", {"cfg_split": True, "decode_frames": 4}),
    ("model+ff+decode2", "B", {"offload": "model", "cfg_split": True, "ff_chunk": 16384, "decode_frames": 2}),
    ("windows12+decode4", "B", {"cfg_split": True, "window_frames": 12, "overlap": 4, "decode_frames": 4}),
    ("C-windows", "C", {"cfg_split": True, "ff_chunk": 16384, "decode_frames": 4, "window_frames": 24, "overlap": 4}),
    ("windows24+model+tile", "C", {"offload": "model", "cfg_split": True, "window_frames": 24, "overlap": 4,
                                   "vae_tile": 256, "decode_frames": 8}),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="NAME.json (default bench/results/planner_<yyyymmdd>.json); .md goes next to it")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per run (memory does not depend on it)")
    parser.add_argument("--alloc-conf", default="expandable_segments:True",
                        help="PYTORCH_CUDA_ALLOC_CONF when the environment does not set one ('' = allocator default)")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: demo model, tiny sizes, 1 step")
    return parser.parse_args()


# ---- measuring ------------------------------------------------------------------------------------
class DeviceMemory:
    """Reads this process's GPU memory: NVML per process when PIDs match, else device used minus the
    idle baseline taken before CUDA started; ``None`` readings without NVML (torch figures remain)."""

    def __init__(self) -> None:
        self.nvml = None
        self.per_process = False
        self.idle_device_mib = 0.0
        try:
            import pynvml  # nvidia-ml-py
        except ImportError as error:
            LOG.warning("NVML unavailable (%s); process peak = context + torch reserved", error)
            return
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.nvml = pynvml
            self.idle_device_mib = self._device_used()
        except pynvml.NVMLError as error:  # no driver: torch figures only
            LOG.warning("NVML failed (%s); process peak = context + torch reserved", error)
            self.nvml = None

    def _device_used(self) -> float:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / MIB

    def process_mib(self) -> float | None:
        if self.nvml is None:
            return None
        pid = os.getpid()
        for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                self.per_process = True
                return proc.usedGpuMemory / MIB
        return self._device_used() - self.idle_device_mib

    def describe(self) -> str:
        if self.nvml is None:
            return "context + torch reserved peak (no NVML)"
        return "NVML per-process" if self.per_process else "NVML device used minus idle baseline"


@dataclass
class PeakSampler:
    """Samples the process's memory on a thread (~200 Hz) while a run works; on CPU the RSS."""

    memory: DeviceMemory | None
    peak_mib: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def reset(self) -> None:
        """Start the peak afresh (after the load phase has returned what it freed)."""
        value = self.read()
        self.peak_mib = 0.0 if value is None else value

    def read(self) -> float | None:
        if self.memory is None:
            return psutil.Process().memory_info().rss / MIB
        return self.memory.process_mib()

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            value = self.read()
            if value is not None:
                self.peak_mib = max(self.peak_mib, value)

    def __enter__(self) -> "PeakSampler":
        self._thread = threading.Thread(target=self._loop, name="peak-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def free_all() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def context_mib(memory: DeviceMemory | None) -> float:
    """Non-allocator memory of the process now (the CUDA context, grown by the kernels loaded so far)."""
    if memory is None:
        return 0.0
    process = memory.process_mib()
    if process is None:
        free, total = torch.cuda.mem_get_info()
        process = (total - free) / MIB
    return process - torch.cuda.memory_reserved() / MIB


# ---- running --------------------------------------------------------------------------------------
def synthetic_image(width: int, height: int) -> Image.Image:
    """A deterministic picture (gradient and a disc): the weights are random, the input need not be real."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width]).reshape(2, 1, 1)
    disc = ((x - 0.6) ** 2 + (y - 0.45) ** 2 < 0.05).astype(float)
    rgb = np.stack([x, y, 0.5 * (1 - x) + 0.5 * disc], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


@dataclass
class Bench:
    pipeline: Any
    planner: Planner
    memory: DeviceMemory | None
    cases: dict[str, tuple[int, int, int]]
    steps: int
    on_cuda: bool

    def settings(self, case: str, changes: dict[str, Any]) -> RunSettings:
        height, width, frames = self.cases[case]
        base = RunSettings(height=height, width=width, num_frames=frames, num_inference_steps=self.steps, seed=0,
                           device="cuda" if self.on_cuda else "cpu", **(FP16 if self.on_cuda else {}))
        return base.replace(**changes).validate()

    def run(self, case: str, config: str, settings: RunSettings, cap_budget: str | None = None) -> dict[str, Any]:
        """One row: run with re-planning (under a simulated card when ``cap_budget`` names a preset)."""
        free_all()
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats()
        image = synthetic_image(settings.width, settings.height)
        row: dict[str, Any] = {"case": case, "config": config, "steps": settings.num_inference_steps,
                               "capped_at": cap_budget, "requested": settings.to_dict()}
        started = time.perf_counter()
        events: list[str] = []
        try:
            with PeakSampler(self.memory if self.on_cuda else None) as sampler:
                if cap_budget is not None and self.on_cuda:
                    with simulated_budget(PRESETS[cap_budget]) as cap_mib:
                        row["allocator_cap_mib"] = round(cap_mib)
                        result = self._generate(settings, image, events, sampler)
                else:
                    result = self._generate(settings, image, events, sampler)
            row.update(completed=True, **self._figures(result, sampler.peak_mib))
        except OutOfMemoryAfterRetries as error:
            row.update(completed=False, error=str(error))
        except Exception as error:  # one broken configuration must not cost the rest of the matrix
            LOG.exception("%s %s failed", case, config)
            row.update(completed=False, error=f"{type(error).__name__}: {error}")
        if row.get("allocator_cap_mib") is not None and row.get("reserved_peak_mib") is not None:
            row["cap_respected"] = row["reserved_peak_mib"] <= row["allocator_cap_mib"] + 1
        row["seconds_total"] = round(time.perf_counter() - started, 2)
        row["user_messages"] = events
        LOG.info("%s %s: %s", case, config, {k: row.get(k) for k in ("completed", "process_peak_mib", "predicted_peak_mib")})
        return row

    def _generate(self, settings: RunSettings, image: Image.Image, events: list[str], sampler: PeakSampler):
        def on_event(event) -> None:
            if event.message:
                events.append(event.message)
            if event.phase == Phase.ENCODE and event.step is None and not event.message:
                # Load just placed the weights: return blocks it freed (weights a previous row left on the
                # GPU) so the peak is this run's own, from encode to decode, as the planner predicts it.
                free_all()
                if self.on_cuda:
                    torch.cuda.reset_peak_memory_stats()
                sampler.reset()

        # the rows' hand-set settings run as given (no budget, no decode rule), through the one run path
        model = LoadedModel(self.pipeline, "svd-xt architecture, random weights", "bench/planner.py", "bench")
        return execute(model, image, plan_run(model, settings, planner=self.planner, apply_plan=False),
                       on_event=on_event)

    def _figures(self, result, sampled_peak_mib: float) -> dict[str, Any]:
        ran = result.settings
        if self.on_cuda:
            torch.cuda.synchronize()
            reserved_peak = torch.cuda.max_memory_reserved() / MIB
            free_all()
            context = context_mib(self.memory)
            process_peak = max(sampled_peak_mib, context + reserved_peak)
            torch_peak = torch.cuda.max_memory_allocated() / MIB
        else:
            reserved_peak = torch_peak = None
            context = 0.0
            process_peak = sampled_peak_mib
        prediction = self.planner.predict(ran, context_mib=context)
        error = (prediction.peak_mib - process_peak) / process_peak if process_peak else None
        return {
            "ran": ran.to_dict(),
            "process_peak_mib": round(process_peak, 1),
            "sampled_peak_mib": round(sampled_peak_mib, 1),
            "torch_peak_mib": None if torch_peak is None else round(torch_peak, 1),
            "reserved_peak_mib": None if reserved_peak is None else round(reserved_peak, 1),
            "context_mib": round(context, 1),
            "predicted_peak_mib": round(prediction.peak_mib, 1),
            "predicted_phase": prediction.peak_phase,
            "predicted_phases_mib": {k: round(v, 1) for k, v in prediction.phases.items()},
            "prediction_error": None if error is None else round(error, 4),
            "seconds_per_step": round(result.seconds_per_step, 4),
            "oom_retries": result.info.get("oom_retries", []),
            "seam_ratio": result.info.get("seam_ratio"),
        }


def build(smoke: bool):
    if smoke:
        from lowvram_studio.models.demo import build_demo_pipeline

        return build_demo_pipeline(), "demo"
    from lowvram_studio.models.svd_configs import build_svd_xt_pipeline

    return build_svd_xt_pipeline(dtype=torch.float16, device="cuda", seed=0), "svd-xt"


def run_matrix(bench: Bench) -> list[dict[str, Any]]:
    rows = [bench.run(case, name, bench.settings(case, changes)) for name, case, changes in CONFIGS]
    request_b = bench.settings("B", {})
    for preset in ("6GB", "4GB"):
        plan = bench.planner.plan(request_b, PRESETS[preset])
        LOG.info("plan for B at %s:\n  %s", preset, "\n  ".join(plan.summary()))
        row = bench.run("B", f"planned-{preset}", plan.settings, cap_budget=preset)
        row.update(plan=plan.to_dict())
        rows.append(row)
    request_a = bench.settings("A", {})
    plan = bench.planner.plan(request_a, PRESETS["6GB"])
    row = bench.run("A", "planned-6GB (write-up: GTX 1060, 24 frames)", plan.settings, cap_budget="6GB")
    row.update(plan=plan.to_dict())
    rows.append(row)
    loose = bench.planner.plan(request_b, PRESETS["8GB"])
    row = bench.run("B", "oom-replan: 8GB plan under 4GB cap", loose.settings, cap_budget="4GB")
    row.update(plan=loose.to_dict())
    rows.append(row)
    return rows


# The write-up's table: card budget and the frames it ran at 512x512 (reference/gtx1060-video-writeup.zh.txt).
WRITEUP_TABLE = (("6GB", 24), ("12GB", 32), ("12GB", 48), ("24GB", 64))


def writeup_plans(bench: Bench) -> list[dict[str, Any]]:
    """What the planner chooses for the write-up's cards and frame counts (predicted, not run)."""
    out = []
    for preset, frames in WRITEUP_TABLE:
        plan = bench.planner.plan(bench.settings("A", {"num_frames": frames}), PRESETS[preset])
        out.append({"preset": preset, "frames": frames, **plan.to_dict()})
    return out


def leave_one_out(rows: list[dict[str, Any]], dims: ModelDims) -> dict[str, Any]:
    """Fit on all rows but one, predict that one; the honest error of a calibrated model."""
    fit_rows = [{"dims": dims, "settings": r["ran"], "process_peak_mib": r["process_peak_mib"],
                 "context_mib": r["context_mib"]} for r in rows]
    errors = {}
    for index, row in enumerate(rows):
        model = calibrate(fit_rows[:index] + fit_rows[index + 1 :])
        predicted = model.predict(dims, RunSettings.from_dict(row["ran"]), row["context_mib"]).peak_mib
        errors[f"{row['case']} {row['config']}"] = round((predicted - row["process_peak_mib"]) / row["process_peak_mib"], 4)
    return errors


def checks(rows: list[dict[str, Any]], dims: ModelDims, out_stem: Path) -> dict[str, Any]:
    free_rows = [r for r in rows if r["capped_at"] is None and r.get("completed")]
    within = [r for r in free_rows if abs(r["prediction_error"]) <= TOLERANCE]
    by_name = {(r["case"], r["config"]): r for r in rows}
    twin, windows = by_name[("A", "A-twin")], by_name[("C", "C-windows")]
    ratio = windows.get("process_peak_mib", 0) / twin["process_peak_mib"] if twin.get("process_peak_mib") else None
    oom = by_name[("B", "oom-replan: 8GB plan under 4GB cap")]
    fitted = calibrate([{"dims": dims, "settings": r["ran"], "process_peak_mib": r["process_peak_mib"],
                         "context_mib": r["context_mib"]} for r in free_rows])
    fitted.save(out_stem.with_name(out_stem.name + "_memory_model.json"))
    loo = leave_one_out(free_rows, dims)
    return {
        "prediction_within_15pct": f"{len(within)}/{len(free_rows)}",
        "prediction_errors": {f"{r['case']} {r['config']}": r["prediction_error"] for r in free_rows},
        "calibrated_coefficients": fitted.coefficients,
        "calibrated_leave_one_out_errors": loo,
        "calibrated_loo_within_15pct": f"{sum(abs(e) <= TOLERANCE for e in loo.values())}/{len(loo)}",
        "B_completes_under_6GB": by_name[("B", "planned-6GB")].get("completed"),
        "B_completes_under_4GB": by_name[("B", "planned-4GB")].get("completed"),
        "C_over_A_peak": None if ratio is None else round(ratio, 3),
        "C_within_1.1x_A": None if ratio is None else ratio <= 1.1,
        "oom_replan_triggered": bool(oom.get("oom_retries")),
        "oom_replan_completed": oom.get("completed"),
        "oom_messages": oom.get("user_messages"),
        "seam_ratios": {f"{r['case']} {r['config']}": r.get("seam_ratio") for r in rows if r.get("seam_ratio") is not None},
    }


# ---- reporting ------------------------------------------------------------------------------------
COLUMNS = ("case", "config", "capped_at", "completed", "process_peak_mib", "predicted_peak_mib", "prediction_error",
           "predicted_phase", "torch_peak_mib", "context_mib", "seconds_per_step", "retries", "seam_ratio")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = {**row, "retries": len(row.get("oom_retries", []))}
        lines.append("| " + " | ".join("" if cells.get(c) is None else str(cells.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def environment(memory: DeviceMemory | None, smoke: bool) -> dict[str, Any]:
    import diffusers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "smoke": smoke, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    if torch.cuda.is_available() and not smoke:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, vram_mib=round(props.total_memory / MIB), cuda=torch.version.cuda,
                   process_peak_source=memory.describe() if memory else None)
        if memory is not None and memory.nvml is not None:
            env["driver"] = memory.nvml.nvmlSystemGetDriverVersion()
    return env


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.alloc_conf and not args.smoke:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", args.alloc_conf)  # before the first CUDA allocation
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU; run with --smoke on a CPU", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    out = args.out or Path(__file__).parent / "results" / f"planner_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    memory = None if args.smoke else DeviceMemory()  # NVML baseline before CUDA starts
    started = time.perf_counter()
    pipeline, name = build(args.smoke)
    dims = ModelDims.from_pipeline(pipeline, name)
    planner = Planner(dims, MemoryModel.load(), device_type="cpu" if args.smoke else "cuda")
    bench = Bench(pipeline, planner, memory, SMOKE_CASES if args.smoke else CASES,
                  1 if args.smoke else args.steps, on_cuda=not args.smoke)
    rows = run_matrix(bench)
    result = {
        "env": environment(memory, args.smoke),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": {"name": name, "dims": dims.__dict__, "weights": "random, seed 0"},
        "note": f"{bench.steps} denoising steps per run: a step's peak does not depend on the step count",
        "rows": rows,
        "checks": checks(rows, dims, out.with_suffix("")),
        "writeup_plans": writeup_plans(bench),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    summary = table(rows)
    writeup = "\n".join(
        f"- {p['preset']}, {p['frames']} frames: {'fits' if p['fits'] else 'does not fit'} at "
        f"{p['predicted_peak_mib'] / 1024:.2f} GiB predicted; " + " / ".join(r.split(";")[0] for r in p["reasons"])
        for p in result["writeup_plans"])
    out.with_suffix(".md").write_text(
        f"# Planner benchmark ({result['env'].get('gpu', 'CPU smoke')})\n\n`{result['command']}`\n\n{summary}\n\n"
        f"## Checks\n\n```json\n{json.dumps(result['checks'], indent=2)}\n```\n\n"
        f"## The write-up's table, planned\n\n{writeup}\n", encoding="utf-8")
    print(summary)
    print(json.dumps({k: v for k, v in result["checks"].items()
                      if k not in ("prediction_errors", "calibrated_leave_one_out_errors", "calibrated_coefficients")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
