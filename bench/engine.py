"""Benchmark of the lossless low-VRAM engine against diffusers on one NVIDIA GPU (issue 4, DESIGN §5-§7).

Full-size SVD-XT architecture with random weights (seed 0), CFG on (1.0 -> 3.0), decode included.
Cases A 512x512x24 and B 576x1024x25. Configurations:

  diffusers-fp32   StableVideoDiffusionPipeline in fp32 (``--steps-fp32`` steps: ~3 s/step at case B)
  diffusers-fp16   the same pipeline in fp16, everything on the GPU
  diffusers-best   fp16 + enable_model_cpu_offload + unet.enable_forward_chunking() + decode_chunk_size=2
  ours-lossless    our sampler: UNet fp16, VAE/encoder fp32, CFG split + frame/token/FF chunking,
                   whole-model placement (UNet weights on the GPU while denoising), chunked+tiled decode
  ours-stream      the same with UNet block streaming (diffusers group offloading on a CUDA stream)
  ours-fp8         ours-lossless with the UNet stored in fp8 (lossy; layerwise casting computes in fp16)
  ours-fidelity    ours-lossless's denoise with diffusers' fp32 decode (all frames at once, no tiles): isolates
                   the fidelity of the lossless engine from the lossy decode; its peak is that decode's

Per row: process peak (NVML per process; fallback device used minus the idle baseline), torch peak
(max_memory_allocated), device peak, s/step (mean over steps 2..N, synchronised), total seconds (model
loaded; one warm-up run first), output FPS, PSNR against diffusers-fp16 and against diffusers-fp32 of the same
case (where the step counts match: ``--steps-fp32 25`` for the fp32 reference), MFU (UNet FLOPs of
one CFG step counted by torch.utils.flop_counter.FlopCounterMode on the meta device, engine/speed_model.py,
over the H100's dense fp16/bf16 peak taken as 989 TFLOP/s for every row, fp32 included). After the matrix:
memory release (5 runs in a row of ours-lossless at case A return to the idle footprint).

    python bench/engine.py --out $OUT/engine.json            # H100, ~6-9 minutes
    python bench/engine.py --cases B --configs diffusers-fp16,ours-lossless
    python bench/engine.py --smoke --out /tmp/engine.json     # demo model on the CPU, logic check
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio  # noqa: E402

from lowvram_studio.engine.events import Phase  # noqa: E402
from lowvram_studio.engine.placement import clear_placement  # noqa: E402
from lowvram_studio.settings_adapter import generate  # noqa: E402
from lowvram_studio.engine.speed_model import count_step_flops  # noqa: E402
from lowvram_studio.settings import RunSettings  # noqa: E402

logger = logging.getLogger("bench.engine")

PEAK_FLOPS = 989e12  # H100 SXM dense fp16/bf16 tensor-core peak
MIB = 2**20
CASES = {"A": (512, 512, 24), "B": (576, 1024, 25)}
SMOKE_CASES = {"A": (64, 64, 4), "B": (64, 128, 5)}
CONFIGS = (
    "diffusers-fp32", "diffusers-fp16", "diffusers-best", "ours-lossless", "ours-stream", "ours-fp8", "ours-fidelity"
)
# ours: (offload, settings overrides)
OURS: dict[str, tuple[str, dict[str, Any]]] = {
    "ours-lossless": ("model", {}),
    "ours-stream": ("stream", {}),
    "ours-fp8": ("model", {"unet_dtype": "fp8"}),
    "ours-fidelity": ("model", {"decode_frames": 0, "vae_tile": 0}),
}
NOTES = {
    "ours-fp8": "lossy: UNet weights stored in fp8 (diffusers layerwise casting), computed in fp16",
    "ours-fidelity": "fidelity check: ours-lossless denoise, diffusers' decode (VAE fp32, all frames, no tiles)",
}
REFERENCE = "diffusers-fp16"
REFERENCE_FP32 = "diffusers-fp32"  # the arithmetic both fp16 paths approximate


# ---- memory -------------------------------------------------------------------------------------
class MemoryProbe:
    """Process / device memory now, via NVML (per process, else device used minus the idle baseline);
    RSS on the CPU. All NVML handling of this script lives here."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pynvml = None
        self.method = "rss"
        if device.type != "cuda":
            return
        import pynvml

        pynvml.nvmlInit()
        self.pynvml = pynvml
        index = device.index or 0
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.baseline = self._device_used()  # before this process creates its CUDA context
        self.method = "nvml-process"

    def _device_used(self) -> int:
        return self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used

    def process(self) -> int:
        if self.pynvml is None:
            return psutil.Process().memory_info().rss
        for proc in self.pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return proc.usedGpuMemory
        # Containers show host PIDs (DESIGN §4): fall back to device used minus the idle baseline.
        self.method = "nvml-device-minus-baseline"
        return self._device_used() - self.baseline

    def device_used(self) -> int | None:
        return self._device_used() if self.pynvml is not None else None

    def env(self) -> dict[str, Any]:
        if self.pynvml is None:
            return {"gpu": None, "driver": None}
        name = self.pynvml.nvmlDeviceGetName(self.handle)
        driver = self.pynvml.nvmlSystemGetDriverVersion()
        decode = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        total = self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).total
        return {"gpu": decode(name), "driver": decode(driver), "vram_mib": round(total / MIB)}


class PeakSampler:
    """Samples the probe on a thread during a run; never touches CUDA itself (DESIGN §4)."""

    def __init__(self, probe: MemoryProbe, interval: float = 0.005):
        self.probe, self.interval = probe, interval
        self.process_peak = 0
        self.device_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        self.process_peak = max(self.process_peak, self.probe.process())
        self.device_peak = max(self.device_peak, self.probe.device_used() or 0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---- pipelines ------------------------------------------------------------------------------------
def build_pipeline(dtype: torch.dtype, device: torch.device, smoke: bool):
    if smoke:
        from lowvram_studio.models.demo import build_demo_pipeline

        pipeline = build_demo_pipeline()
        for module in (pipeline.unet, pipeline.vae, pipeline.image_encoder):
            module.to(device=device, dtype=dtype)
        return pipeline
    from lowvram_studio.models.svd_configs import build_svd_xt_pipeline

    return build_svd_xt_pipeline(dtype=dtype, device=device, seed=0)


def test_image(width: int, height: int) -> PIL.Image.Image:
    """Smooth gradients and a disc: the same input for every configuration."""
    y, x = np.mgrid[0:height, 0:width]
    x, y = x / max(width - 1, 1), y / max(height - 1, 1)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(float)
    rgb = np.stack([x, y, 0.5 + 0.5 * disc], axis=-1)
    return PIL.Image.fromarray((rgb * 255).astype(np.uint8))


# ---- one measured run -----------------------------------------------------------------------------
@dataclass
class Timed:
    frames: np.ndarray
    seconds_total: float
    step_times: list[float]


def run_diffusers(pipeline, image, case, steps: int, decode_frames: int | None, device: torch.device) -> Timed:
    height, width, frames = case
    step_times: list[float] = []

    def on_step(_pipe, _index, _timestep, kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter())
        return kwargs

    started = time.perf_counter()
    out = pipeline(
        image,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        decode_chunk_size=decode_frames,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
        callback_on_step_end=on_step,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return Timed(np.asarray(out.frames[0], dtype=np.float32), time.perf_counter() - started, step_times)


def run_ours(pipeline, image, settings: RunSettings) -> Timed:
    started = time.perf_counter()
    result = generate(pipeline, image, settings)
    total = time.perf_counter() - started
    steps = [e.time for e in result.events if e.phase == Phase.DENOISE and e.step]
    return Timed(result.frames, total, steps)


def seconds_per_step(timed: Timed) -> float | None:
    """Mean step time over steps 2..N (the first step carries one-off setup)."""
    times = timed.step_times
    if len(times) < 2:
        return None
    return (times[-1] - times[0]) / (len(times) - 1)


def ours_settings(
    args: argparse.Namespace, case, steps: int, config: str, device: torch.device
) -> RunSettings:
    height, width, frames = case
    tiled = width > args.vae_tile or height > args.vae_tile
    offload, overrides = OURS[config]
    return RunSettings.from_dict(
        {
            "height": height,
            "width": width,
            "num_frames": frames,
            "num_inference_steps": steps,
            "seed": 0,
            "device": device.type,
            "unet_dtype": "fp16",
            "vae_dtype": "fp32",
            "encoder_dtype": "fp32",
            "cfg_split": True,
            "spatial_chunk": args.spatial_chunk,
            "temporal_chunk": args.temporal_chunk,
            "ff_chunk": args.ff_chunk,
            "offload": offload,
            "decode_frames": args.decode_frames,
            "vae_tile": args.vae_tile if tiled else 0,
            **overrides,
        }
    ).validate()


def measure(
    name: str,
    case_name: str,
    steps: int,
    run: Callable[[int], Timed],
    probe: MemoryProbe,
    device: torch.device,
    warmup_steps: int,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Warm up, then one measured run; a row with every figure (null where it could not be measured)."""
    row: dict[str, Any] = {"case": case_name, "config": name, "steps": steps, "note": NOTES.get(name, "")}
    try:
        if warmup_steps:
            run(warmup_steps)
        free(device)
        row["process_idle_mib"] = round(probe.process() / MIB)
        with PeakSampler(probe) as sampler:
            timed = run(steps)
        row.update(
            process_peak_mib=round(sampler.process_peak / MIB),
            torch_peak_mib=round(torch.cuda.max_memory_allocated() / MIB) if device.type == "cuda" else None,
            device_peak_mib=round(sampler.device_peak / MIB) if device.type == "cuda" else None,
            seconds_per_step=seconds_per_step(timed),
            seconds_total=timed.seconds_total,
            output_fps=timed.frames.shape[0] / timed.seconds_total,
        )
        free(device)
        row["process_after_mib"] = round(probe.process() / MIB)
        logger.info("%s %s: %s", case_name, name, {k: row[k] for k in ("process_peak_mib", "seconds_per_step")})
        return row, timed.frames
    except torch.cuda.OutOfMemoryError as error:
        row["error"] = f"out of memory: {str(error).splitlines()[0][:120]}"
        logger.warning("%s %s: out of memory", case_name, name)
        free(device)
        return row, None


def release_check(pipeline, image, settings: RunSettings, probe: MemoryProbe, device: torch.device, runs: int = 5):
    """Issue 4 item 5: after each run the process is back at its idle footprint (within 1 %), no growth."""
    generate(pipeline, image, settings)
    free(device)
    idle = probe.process()
    after = []
    for _ in range(runs):
        generate(pipeline, image, settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        after.append(probe.process())
    worst = max(abs(a - idle) for a in after) / idle * 100
    return {
        "config": "ours-lossless",
        "case": settings.extra.get("case"),
        "steps": settings.num_inference_steps,
        "idle_mib": round(idle / MIB),
        "after_each_run_mib": [round(a / MIB) for a in after],
        "worst_deviation_pct": round(worst, 3),
        "growth_mib": round((after[-1] - after[0]) / MIB),
        "within_1pct": worst <= 1.0,
    }


# ---- report -----------------------------------------------------------------------------------------
def psnr_against(rows: list[dict[str, Any]], frames: dict[tuple[str, str], np.ndarray], row: dict[str, Any],
                 reference: str) -> float | None:
    """PSNR of ``row``'s frames against ``reference``'s of the same case (None where the step counts differ)."""
    ref_row = next((r for r in rows if r["case"] == row["case"] and r["config"] == reference and "error" not in r), None)
    ref_frames, mine = frames.get((row["case"], reference)), frames.get((row["case"], row["config"]))
    if ref_row is None or ref_row["steps"] != row["steps"] or row["config"] == reference:
        return None
    if ref_frames is None or mine is None:
        return None
    return float(peak_signal_noise_ratio(ref_frames, mine, data_range=1.0))


def add_comparisons(rows: list[dict[str, Any]], frames: dict[tuple[str, str], np.ndarray], flops: dict[str, int]) -> None:
    for row in rows:
        case = row["case"]
        ref_row = next((r for r in rows if r["case"] == case and r["config"] == REFERENCE and "error" not in r), None)
        # the report is saved after every row: a PSNR once computed is kept, not recomputed over full videos
        for key, reference in (("psnr_db", REFERENCE), ("psnr_vs_fp32_db", REFERENCE_FP32)):
            if row.get(key) is None:
                row[key] = psnr_against(rows, frames, row, reference)
        step = row.get("seconds_per_step")
        ref_step = ref_row.get("seconds_per_step") if ref_row else None
        row["ratio_vs_fp16"] = step / ref_step if step and ref_step else None
        ref_total = ref_row.get("seconds_total") if ref_row else None
        row["total_ratio_vs_fp16"] = row["seconds_total"] / ref_total if row.get("seconds_total") and ref_total else None
        row["flops_per_step"] = flops.get(case)
        row["mfu"] = flops[case] / step / PEAK_FLOPS if step and flops.get(case) else None


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    env = report["env"]
    lines = [
        f"# Engine benchmark ({env['date']})",
        "",
        f"GPU {env['gpu']} (driver {env['driver']}), torch {env['torch']}, diffusers {env['diffusers']}, "
        f"process memory by {env['process_memory_method']}, allocator `{env['alloc_conf']}`.",
        f"MFU = UNet FLOPs per CFG step (FlopCounterMode) / s/step / {PEAK_FLOPS / 1e12:.0f} TFLOP/s "
        "(H100 dense fp16/bf16 peak, used for every row). PSNR against diffusers-fp16 and diffusers-fp32 of the "
        "same case (n/a where step counts differ). s/step = mean of steps 2..N. Command: "
        f"`{report['command']}`",
        "",
        "| case | config | steps | process peak MiB | torch peak MiB | device peak MiB | s/step | x fp16 | total s "
        "| x fp16 total | output FPS | PSNR vs fp16 dB | PSNR vs fp32 dB | MFU % | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        mfu = r.get("mfu")
        lines.append(
            f"| {r['case']} | {r['config']} | {r['steps']} | {fmt(r.get('process_peak_mib'))} | "
            f"{fmt(r.get('torch_peak_mib'))} | {fmt(r.get('device_peak_mib'))} | {fmt(r.get('seconds_per_step'), 3)} | "
            f"{fmt(r.get('ratio_vs_fp16'))} | {fmt(r.get('seconds_total'), 1)} | {fmt(r.get('total_ratio_vs_fp16'))} | "
            f"{fmt(r.get('output_fps'))} | {fmt(r.get('psnr_db'), 1)} | {fmt(r.get('psnr_vs_fp32_db'), 1)} | {fmt(mfu * 100 if mfu else None, 1)} | "
            f"{r.get('error') or r.get('note', '')} |"
        )
    release = report.get("release")
    if release:
        lines += [
            "",
            f"Memory release ({release['config']}, case {release['case']}, {release['steps']} steps, 5 runs): idle "
            f"{release['idle_mib']} MiB, after each run {release['after_each_run_mib']} MiB, worst deviation "
            f"{release['worst_deviation_pct']} %, growth {release['growth_mib']} MiB -> "
            f"{'within 1 %' if release['within_1pct'] else 'NOT within 1 %'}.",
        ]
    lines += ["", "Ours settings: " + json.dumps(report.get("ours_settings"))]
    return "\n".join(lines) + "\n"


# ---- main -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(f"bench/results/engine_{today}.json"))
    parser.add_argument("--cases", default="A,B")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--steps-fp32", type=int, default=4, help="steps for diffusers-fp32 rows (~3 s/step at B)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the warm-up run per row (0 = none)")
    parser.add_argument("--release-steps", type=int, default=3, help="steps per run of the release check (0 = skip)")
    parser.add_argument("--spatial-chunk", type=int, default=5, help="ours: frames per spatial-layer call")
    parser.add_argument("--temporal-chunk", type=int, default=2304, help="ours: positions per temporal-block call")
    parser.add_argument("--ff-chunk", type=int, default=4096, help="ours: tokens per feed-forward call")
    parser.add_argument("--decode-frames", type=int, default=5, help="ours: frames per VAE decode call (0 = all)")
    parser.add_argument("--vae-tile", type=int, default=256, help="ours: VAE tile side in pixels (0 = none)")
    parser.add_argument("--smoke", action="store_true", help="demo model on the CPU at tiny sizes (logic check)")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS] + [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case/config {', '.join(unknown)}; choose cases from A,B and configs from {', '.join(CONFIGS)}")
    if args.smoke:
        args.spatial_chunk, args.temporal_chunk, args.ff_chunk = 2, 16, 64
        args.decode_frames, args.vae_tile = 3, 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Less fragmentation, so reserved memory (what NVML sees) stays near allocated; applies to every row.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = torch.device("cpu" if args.smoke else "cuda")
    cases = {name: (SMOKE_CASES if args.smoke else CASES)[name] for name in args.cases}
    probe = MemoryProbe(device)
    import diffusers

    report: dict[str, Any] = {
        "env": {
            **probe.env(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "peak_flops_assumed": PEAK_FLOPS,
            "model": "demo (smoke)" if args.smoke else "SVD-XT architecture, random weights seed 0",
        },
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "rows": [],
    }
    rows: list[dict[str, Any]] = report["rows"]
    frames: dict[tuple[str, str], np.ndarray] = {}
    flops: dict[str, int] = {}
    images = {name: test_image(case[1], case[0]) for name, case in cases.items()}
    wanted = set(args.configs)

    def save() -> str:
        """Write the report as it stands: a run cut short by a time limit keeps every finished row."""
        add_comparisons(rows, frames, flops)
        report["env"]["process_memory_method"] = probe.method
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        table = markdown(report)
        args.out.with_suffix(".md").write_text(table, encoding="utf-8")
        return table

    def record(name: str, case_name: str, steps: int, run: Callable[[int], Timed]) -> None:
        row, out = measure(name, case_name, steps, run, probe, device, args.warmup_steps)
        rows.append(row)
        if out is not None:
            frames[(case_name, name)] = out
        save()

    def count_flops(unet: torch.nn.Module) -> None:
        for name, case in cases.items():
            if name not in flops:
                flops[name] = int(count_step_flops(unet.config, *case))
                logger.info("case %s: %.1f TFLOP per CFG step", name, flops[name] / 1e12)

    # 1. fp32 pipeline: diffusers-fp32 rows; later, cast in place, ours (same seed-0 weights as fp16's)
    need_ours = bool(wanted & set(OURS))
    fp32 = build_pipeline(torch.float32, device, args.smoke) if (need_ours or "diffusers-fp32" in wanted) else None
    if "diffusers-fp32" in wanted:
        count_flops(fp32.unet)
        for case_name, case in cases.items():
            record("diffusers-fp32", case_name, args.steps_fp32,
                   lambda s, c=case, i=images[case_name]: run_diffusers(fp32, i, c, s, None, device))
    if fp32 is not None:
        fp32.to("cpu")
        free(device)

    # 2. fp16 pipeline: diffusers-fp16 (the reference), then best practice
    if wanted & {"diffusers-fp16", "diffusers-best"}:
        fp16 = build_pipeline(torch.float16, device, args.smoke)
        count_flops(fp16.unet)
        if "diffusers-fp16" in wanted:
            for case_name, case in cases.items():
                record("diffusers-fp16", case_name, args.steps,
                       lambda s, c=case, i=images[case_name]: run_diffusers(fp16, i, c, s, None, device))
        if "diffusers-best" in wanted:
            fp16.enable_model_cpu_offload(device=device)
            fp16.unet.enable_forward_chunking()
            for case_name, case in cases.items():
                record("diffusers-best", case_name, args.steps,
                       lambda s, c=case, i=images[case_name]: run_diffusers(fp16, i, c, s, 2, device))
        del fp16
        free(device)

    # 3. ours on the fp32-built pipeline (the policy casts the UNet to fp16: the same weights as above)
    report["ours_settings"] = {
        k: getattr(args, k) for k in ("spatial_chunk", "temporal_chunk", "ff_chunk", "decode_frames", "vae_tile")
    }

    def run_ours_config(name: str) -> None:
        if not flops:
            count_flops(fp32.unet)
        for case_name, case in cases.items():
            record(name, case_name, args.steps,
                   lambda s, c=case, i=images[case_name]: run_ours(fp32, i, ours_settings(args, c, s, name, device)))
        clear_placement(fp32)
        free(device)

    for name in ("ours-lossless", "ours-stream"):
        if name in wanted:
            run_ours_config(name)
    if args.release_steps and "ours-lossless" in wanted:
        case_name = "A" if "A" in cases else next(iter(cases))
        settings = ours_settings(args, cases[case_name], args.release_steps, "ours-lossless", device)
        settings.extra["case"] = case_name
        report["release"] = release_check(fp32, images[case_name], settings, probe, device)
        clear_placement(fp32)
        free(device)
    if "ours-fidelity" in wanted:
        run_ours_config("ours-fidelity")
    if "ours-fp8" in wanted:  # last: rounding the shared UNet to fp8 cannot be undone (PrecisionError)
        run_ours_config("ours-fp8")

    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
