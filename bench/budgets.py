"""A budget is a promise: run the user's own command under each VRAM budget and meter it from outside.

    python bench/budgets.py --out $OUT/budgets.json             # H100: full-size SVD-XT, random weights
    python bench/budgets.py --out /tmp/budgets.json --smoke     # CPU check of this script: demo model

Every row is one ``lowvram-studio generate`` process, exactly as a user starts it (``--vram-budget 6GB``,
default precision settings, model loaded from a diffusers folder on disk), so the CUDA context, the
caching allocator, the decode and the export all count and no simulated allocator cap hides anything:
the card is the cap. This script never touches CUDA itself; it samples the child's GPU memory with NVML
(per process when the container shows PIDs, else device used minus the idle reading taken before the
child started) every few milliseconds, and splits the samples into phases with the event times of the
child's run record (``time.perf_counter``: one system-wide monotonic clock on Linux). A row passes when
the child's process peak stays under the budget's share of the card (budget minus the desktop reserve,
what the planner plans for).

Rows: cases A 512x512x24, B 576x1024x25, C 512x512x96 (bench/planner.py's) x budgets 4/6/8 GB, then the
#17.3 rows: cases A and B without a budget, FP16 weights computing in FP16 vs in FP32 (the Pascal path:
per-layer up-casts), decode 4 frames at a time so the denoise phase sets the peak; then cases A and B
with no budget and default settings (issue 21.11: the decode rule must keep an fp32 all-frames decode,
76.9 GiB at case B before it, from setting the peak). Runs take 2 steps
(the peak of a step does not depend on the count; s/step figures are of 2-step runs). The full-size model
is written once into ``--model-dir`` by a child process (random weights, seed 0, fp16 safetensors).
Partial results are rewritten after every row, so a device call cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import device_run_arguments, write_report  # noqa: E402
from lowvram_studio.engine.events import Phase  # noqa: E402

CASES = {"A": (512, 512, 24), "B": (576, 1024, 25), "C": (512, 512, 96)}
SMOKE_CASES = {"A": (64, 64, 6), "B": (64, 128, 7), "C": (64, 64, 14)}
BUDGETS = ("4GB", "6GB", "8GB")
# the table's phase columns, by the records' phase labels (encode's is "encode image")
PHASE_COLUMNS = tuple(phase.value for phase in (Phase.ENCODE, Phase.DENOISE, Phase.DECODE, Phase.EXPORT))


def rows_to_run(smoke: bool) -> list[dict[str, Any]]:
    """The matrix: every case under every budget, then the FP16-compute vs FP32-compute pairs."""
    rows = [{"name": f"{case} {budget}", "case": case, "flags": ["--vram-budget", budget], "budget": budget}
            for budget in BUDGETS for case in CASES]
    for case in ("A", "B"):
        for compute in ("fp16", "fp32"):
            flags = ["--unet-dtype", "fp16", "--half-compute", compute, "--cfg-split", "--decode-frames", "4"]
            rows.append({"name": f"{case} fp16-storage {compute}-compute", "case": case, "flags": flags, "budget": None})
    for case in ("A", "B"):  # no budget, default settings: the decode rule alone keeps decode from setting the peak
        rows.append({"name": f"{case} no budget", "case": case, "flags": [], "budget": None})
    if smoke:  # one row of each kind is enough to check the script
        rows = [rows[0], rows[-1]]
    return rows


# ---- the outside meter ---------------------------------------------------------------------------
class ChildMeter:
    """NVML samples of one child's GPU memory (MiB) with perf_counter stamps, taken on a thread."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self.mode = "none"
        self._stop = threading.Event()
        self._pid: int | None = None
        try:
            import pynvml  # nvidia-ml-py
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as error:  # no NVIDIA driver (the CPU smoke run): rows keep the child's own figures
            print(f"NVML unavailable ({error}); no outside meter", file=sys.stderr)
            self._nvml = None
            return
        self.idle_mib = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20

    def _read(self) -> float | None:
        nvml = self._nvml
        try:
            for process in nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if process.pid == self._pid and process.usedGpuMemory is not None:
                    self.mode = "per-process"
                    return process.usedGpuMemory / 2**20
        except nvml.NVMLError:
            pass
        if self.mode == "per-process":
            return 0.0  # the child's context is gone
        self.mode = "device-minus-idle"
        return nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20 - self.idle_mib

    def watch(self, pid: int) -> threading.Thread | None:
        if self._nvml is None:
            return None
        self.samples, self._pid, self.mode = [], pid, "none"
        self.idle_mib = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                value = self._read()
                if value is not None:
                    self.samples.append((time.perf_counter(), value))
                time.sleep(self.interval_s)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    def stop(self, thread: threading.Thread | None) -> None:
        self._stop.set()
        if thread is not None:
            thread.join()


def phase_spans(record: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(phase, start, end) in perf_counter seconds from the record's events; the last ends at +inf."""
    starts: list[tuple[str, float]] = []
    for event in record.get("events", []):
        if not starts or starts[-1][0] != event["phase"]:
            starts.append((event["phase"], float(event["time"])))
    return [(phase, start, starts[i + 1][1] if i + 1 < len(starts) else float("inf"))
            for i, (phase, start) in enumerate(starts)]


def phase_peaks(samples: list[tuple[float, float]], spans: list[tuple[str, float, float]]) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for phase, start, end in spans:
        inside = [mib for t, mib in samples if start <= t < end]
        if inside:
            peaks[phase] = round(max(peaks.get(phase, 0.0), max(inside)), 1)
    return peaks


def find_plan(record: dict[str, Any]) -> dict[str, Any] | None:
    return (record.get("info") or {}).get("plan")


# ---- one row -------------------------------------------------------------------------------------
def run_metered(command: list[str], meter: ChildMeter, timeout: float) -> tuple[int, str, float]:
    """Run ``command`` from the repository root under ``meter``, killed after ``timeout`` s: (return code,
    stdout and stderr together, seconds)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    thread = meter.watch(child.pid)
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        output, _ = child.communicate()
    meter.stop(thread)
    return child.returncode, output, time.perf_counter() - started


def run_row(row: dict[str, Any], args: argparse.Namespace, meter: ChildMeter, cases: dict, image: Path,
            available: dict[str, float]) -> dict[str, Any]:
    height, width, frames = cases[row["case"]]
    video = args.out.parent / "videos" / f"{row['name'].replace(' ', '_')}.mp4"
    video.parent.mkdir(parents=True, exist_ok=True)
    for stale in (video, video.with_suffix(".json")):
        stale.unlink(missing_ok=True)
    command = [sys.executable, "-m", "lowvram_studio.cli", "generate", "--image", str(image), "--out", str(video),
               "--model", args.model, "--height", str(height), "--width", str(width), "--frames", str(frames),
               "--steps", str(args.steps), "--seed", "0", "--device", "cpu" if args.smoke else "cuda", *row["flags"]]
    returncode, output, seconds = run_metered(command, meter, args.row_timeout)
    out: dict[str, Any] = {**row, "command": " ".join(command[1:]), "rc": returncode,
                           "seconds_total": round(seconds, 1), "meter": meter.mode}
    record_path = video.with_suffix(".json")
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if returncode != 0 or not record:
        out["output_tail"] = output[-2000:]
    samples = meter.samples
    out["process_peak_mib"] = round(max(mib for _, mib in samples), 1) if samples else None
    out["phase_peaks_mib"] = phase_peaks(samples, phase_spans(record)) if samples and record else {}
    results = record.get("results", {})
    out["record_peak_mib"] = results.get("process_peak_mib")  # the child's own meter, for comparison
    out["torch_peak_mib"] = results.get("torch_peak_mib")
    out["env"] = record.get("env")
    out["seconds_per_step"] = results.get("seconds_per_step")
    out["execution_path"] = (record.get("info") or {}).get("execution_path")
    out["ran"] = record.get("settings")
    plan = find_plan(record)
    if plan is not None:
        out["predicted_peak_mib"] = plan["predicted_peak_mib"]
        out["predicted_phases_mib"] = plan["predicted_phases_mib"]
        out["plan_reasons"] = plan["reasons"]
    if row["budget"] is not None:
        out["available_mib"] = available[row["budget"]]
        peak = out["process_peak_mib"]
        out["within_budget"] = bool(returncode == 0 and peak is not None and peak <= out["available_mib"])
    print(f"{row['name']}: rc {returncode}, peak {out['process_peak_mib']} MiB "
          f"({out['meter']}), predicted {out.get('predicted_peak_mib')}, phases {out['phase_peaks_mib']}", flush=True)
    return out


def write_input_image(path: Path, size: tuple[int, int]) -> Path:
    """The rows' input: a yellow disc on blue, ``size`` (width, height), which every CLI run crops to its clip."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    picture = Image.new("RGB", size, (40, 90, 160))
    radius = height * 0.23
    ImageDraw.Draw(picture).ellipse((width / 2 - radius, height / 2 - radius, width / 2 + radius, height / 2 + radius),
                                    fill=(230, 200, 40))
    picture.save(path)
    return path


def build_model(model_dir: Path) -> None:
    """Write full-size SVD-XT with random weights as a diffusers folder, in a child (this process stays off CUDA)."""
    if (model_dir / "model_index.json").exists():
        return
    code = ("import sys, torch; from lowvram_studio.models.svd_configs import build_svd_xt_pipeline; "
            "build_svd_xt_pipeline(dtype=torch.float16, device='cuda', seed=0)"
            ".save_pretrained(sys.argv[1], safe_serialization=True)")
    subprocess.run([sys.executable, "-c", code, str(model_dir)], check=True, cwd=Path(__file__).resolve().parents[1])


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| row | budget share MiB | process peak MiB | per phase (encode / denoise / decode / export) | predicted | within | s/step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        phases = r.get("phase_peaks_mib", {})
        per_phase = " / ".join(str(phases.get(p, "-")) for p in PHASE_COLUMNS)
        within = {True: "yes", False: "**no**", None: "-"}[r.get("within_budget")]
        lines.append(f"| {r['name']} | {r.get('available_mib', '-')} | {r.get('process_peak_mib')} | {per_phase} | "
                     f"{r.get('predicted_peak_mib', '-')} | {within} | {r.get('seconds_per_step')} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    device_run_arguments(parser, "budgets", steps=2)
    parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--row-timeout", type=float, default=300.0)
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: demo model, tiny sizes")
    args = parser.parse_args()
    begun = time.perf_counter()
    from lowvram_studio.plan.budgets import PRESETS

    available = {name: PRESETS[name].available_mib for name in BUDGETS}
    cases = SMOKE_CASES if args.smoke else CASES
    if args.smoke:
        args.model = "demo"
    else:
        build_model(args.model_dir)
        args.model = str(args.model_dir)
    image = write_input_image(args.out.parent / "budget_input.png", (1024, 576))
    meter = ChildMeter()
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for row in rows_to_run(args.smoke):
        if wanted and row["name"] not in wanted:
            continue
        if time.perf_counter() - begun > args.deadline:
            rows.append({**row, "skipped": "deadline"})
            continue
        rows.append(run_row(row, args, meter, cases, image, available))
        env = next((r["env"] for r in rows if r.get("env")), {})  # the child's stamp: this process stays off CUDA
        report = {"env": env, "command": "python " + " ".join(sys.argv), "steps": args.steps, "cases": cases,
                  "model": "demo" if args.smoke else "SVD-XT architecture, random weights (seed 0), fp16 safetensors folder",
                  "rows": rows, "all_within_budget": all(r.get("within_budget", True) for r in rows)}
        args.out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")  # partial results survive
    write_report(args.out, "VRAM budgets measured from outside (NVML, the user's own command)", report, table(rows))
    return 0 if report.get("all_within_budget") else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
