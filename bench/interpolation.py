"""Does generating half the frames and interpolating the rest save memory and time? (issue 9)

The write-up claims frame extraction + interpolation is the biggest saver (-60 % VRAM, +80 % speed)
and asks whether 12 frames interpolated to 24 can replace 24 on a 4 GB card. This bench runs, on
full-size SVD-XT with random weights seeded 0 (case A, 512x512, CFG on, decode included):

  generate-24      24 frames generated at fps 8                  -> 24 frames at 8 fps
  generate-12-x2   12 frames generated at fps 4 (the same motion span), then x2 interpolation
                                                                 -> 23 frames at 8 fps

each in fp16 under two decode profiles: ``decode-all`` (the VAE decodes all frames at once, as
diffusers fp16) and ``decode-2`` (decode_frames=2, how a small card runs, where the decode peak no
longer dominates). The delivery rule keeps every generated frame and inserts one
between neighbours, so 12 become 23.
Process peak: NVML per-process used memory (device used minus the idle baseline where the
container hides our PID); torch peak: ``torch.cuda.max_memory_allocated``. Interpolation runs on
the CPU (OpenCV), so it adds time, not VRAM.

    python bench/interpolation.py --out bench/results/interpolation_YYYYMMDD.json   # H100, ~3 min
    python bench/interpolation.py --smoke --out /tmp/interp_smoke.json            # demo model, CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowvram_studio.interpolate import interpolate_frames, output_fps  # noqa: E402
from lowvram_studio.settings import RunSettings  # noqa: E402

logger = logging.getLogger("bench.interpolation")
MIB = 2**20


@dataclass(frozen=True)
class Case:
    """One row of the matrix: how many frames are generated and how they are delivered."""

    config: str
    generated: int
    factor: int


# Engine profiles: RunSettings changes on top of the base settings (fp16 everywhere on the GPU).
PROFILES: dict[str, dict[str, Any]] = {"decode-all": {"decode_frames": 0}, "decode-2": {"decode_frames": 2}}


# ---- memory sampling ------------------------------------------------------------------------------


class PeakSampler:
    """Samples process, device (NVML) and RSS memory in a thread and keeps the peaks.

    Bench-local until lowvram_studio/monitor/vram.py lands; same definitions as DESIGN §3. NVML
    never creates a CUDA context, so the thread is safe next to the sampler.
    """

    def __init__(self, nvml_handle: Any, baseline_mib: float | None, interval_s: float = 0.01):
        self.handle = nvml_handle
        self.baseline_mib = baseline_mib
        self.interval_s = interval_s
        self.process_peak_mib: float | None = None
        self.device_peak_mib: float | None = None
        self.ram_peak_mib = 0.0
        self.process_source = "n/a"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        self.ram_peak_mib = max(self.ram_peak_mib, psutil.Process().memory_info().rss / MIB)
        if self.handle is None:
            return
        import pynvml

        device = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / MIB
        self.device_peak_mib = max(self.device_peak_mib or 0.0, device)
        process = _own_process_mib(self.handle)
        if process is not None:
            self.process_source = "nvml-process"
        elif self.baseline_mib is not None:
            # PIDs differ inside containers: our process is the device minus what was there before us.
            process, self.process_source = device - self.baseline_mib, "device-minus-baseline"
        if process is not None:
            self.process_peak_mib = max(self.process_peak_mib or 0.0, process)


def _own_process_mib(handle: Any) -> float | None:
    import pynvml

    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) or []:
        if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
            return proc.usedGpuMemory / MIB
    return None


def open_nvml() -> tuple[Any, float | None, dict[str, Any]]:
    """NVML handle of GPU 0, device memory used before we create a CUDA context, and GPU facts.

    Without NVML (module missing, no driver) the bench goes on with torch peaks only.
    """
    try:
        import pynvml
    except ImportError as error:
        logger.warning("nvidia-ml-py missing (%s): process and device peaks will be null", error)
        return None, None, {"gpu": None}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        logger.warning("NVML unavailable (%s): process and device peaks will be null", error)
        return None, None, {"gpu": None}
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    info = pynvml.nvmlDeviceGetMemoryInfo(handle)
    facts = {
        "gpu": pynvml.nvmlDeviceGetName(handle),
        "driver": pynvml.nvmlSystemGetDriverVersion(),
        "vram_total_mib": round(info.total / MIB),
    }
    return handle, info.used / MIB, facts


# ---- the runs -----------------------------------------------------------------------------------------


def input_image(width: int, height: int) -> Image.Image:
    """A deterministic test picture (gradient and shapes): content does not matter for random weights."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([xs / width, ys / height, 0.5 + 0.5 * np.sin(xs / 17.0) * np.cos(ys / 23.0)], axis=-1)
    rgb[(xs - width / 2) ** 2 + (ys - height / 2) ** 2 < (min(width, height) / 5) ** 2] = (0.9, 0.2, 0.1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def run_case(
    pipeline: Any, image: Image.Image, base: RunSettings, profile: str, case: Case, fps: int, sampler_args: dict
) -> dict:
    """Generate ``case.generated`` frames, interpolate by ``case.factor``; peaks and times of both."""
    import torch

    from lowvram_studio.settings_adapter import generate

    changes = {**PROFILES[profile], "num_frames": case.generated, "fps": max(1, fps // case.factor)}
    settings = base.replace(**changes).validate()
    cuda = torch.cuda.is_available() and settings.device.value != "cpu"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with PeakSampler(**sampler_args) as peaks:
        start = time.perf_counter()
        result = generate(pipeline, image, settings)
        generated_s = time.perf_counter() - start
        clip = interpolate_frames(result.frames, case.factor)
        total_s = time.perf_counter() - start
    delivered = len(clip.frames)
    return {
        "case": "A" if (settings.height, settings.width) == (512, 512) else f"{settings.height}x{settings.width}",
        "profile": profile,
        "config": f"{profile}/{case.config}",
        "steps": settings.num_inference_steps,
        "height": settings.height,
        "width": settings.width,
        "generated_frames": case.generated,
        "interpolate": case.factor,
        "delivered_frames": delivered,
        "video_fps": output_fps(settings.fps, case.factor),
        "process_peak_mib": _round(peaks.process_peak_mib),
        "process_peak_source": peaks.process_source,
        "torch_peak_mib": _round(torch.cuda.max_memory_allocated() / MIB) if cuda else None,
        "device_peak_mib": _round(peaks.device_peak_mib),
        "ram_peak_mib": _round(peaks.ram_peak_mib),
        "seconds_total": round(total_s, 3),
        "seconds_generate": round(generated_s, 3),
        "seconds_interpolate": round(total_s - generated_s, 3),
        "seconds_per_step": _round(result.seconds_per_step, 4),
        "phase_seconds": {str(getattr(k, "value", k)): round(v, 3) for k, v in result.phase_seconds.items()},
        "output_fps": round(delivered / total_s, 3),
        "psnr_db": None,  # random weights: no reference video to compare against
    }


def add_ratios(rows: list[dict], reference: Case) -> None:
    """Peak and time of every row relative to its profile's reference row (generate-24)."""
    for row in rows:
        ref = next(r for r in rows if r["profile"] == row["profile"] and r["config"].endswith("/" + reference.config))
        peak_key = "process_peak_mib" if ref["process_peak_mib"] else "ram_peak_mib"
        row["peak_ratio_vs_reference"] = _ratio(row[peak_key], ref[peak_key])
        row["torch_peak_ratio_vs_reference"] = _ratio(row["torch_peak_mib"], ref["torch_peak_mib"])
        row["time_ratio_vs_reference"] = _ratio(row["seconds_total"], ref["seconds_total"])


def _ratio(value: float | None, reference: float | None) -> float | None:
    return round(value / reference, 3) if value is not None and reference else None


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(float(value), digits)


# ---- output --------------------------------------------------------------------------------------------

COLUMNS = (
    "config", "generated_frames", "delivered_frames", "video_fps", "process_peak_mib", "torch_peak_mib",
    "ram_peak_mib", "seconds_generate", "seconds_interpolate", "seconds_total", "seconds_per_step",
    "output_fps", "peak_ratio_vs_reference", "time_ratio_vs_reference",
)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join("n/a" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def environment(gpu_facts: dict[str, Any]) -> dict[str, Any]:
    import cv2
    import diffusers
    import torch

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "opencv": cv2.__version__,
        "cpu_count": os.cpu_count(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **gpu_facts,
    }


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set key=value`` -> RunSettings fields; values parsed as JSON when they are JSON."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {pair!r} is not key=value; write e.g. --set decode_frames=4")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(f"bench/results/interpolation_{dt.date.today():%Y%m%d}.json"))
    parser.add_argument("--steps", type=int, default=25, help="sampler steps (25 = published figures, DESIGN §5)")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--frames", type=int, default=None, help="frames of the reference run (24; smoke: 8)")
    parser.add_argument("--factor", type=int, default=2, choices=(2, 4), help="interpolation factor")
    parser.add_argument("--fps", type=int, default=8, help="frame rate of the delivered video")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra RunSettings field for every run (profiles apply on top), e.g. --set seed=1")
    parser.add_argument("--smoke", action="store_true", help="demo model on the CPU at 64x64, 2 steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    args.frames = args.frames or (8 if args.smoke else 24)
    if args.frames % args.factor:
        parser.error(f"--frames {args.frames} is not divisible by --factor {args.factor}; pick e.g. --frames 24")
    cases = [
        Case(f"generate-{args.frames}", args.frames, 1),
        Case(f"generate-{args.frames // args.factor}-x{args.factor}", args.frames // args.factor, args.factor),
    ]

    import torch

    if args.smoke:
        from lowvram_studio.models.demo import build_demo_pipeline

        nvml, baseline, facts = None, None, {"gpu": None}
        base = RunSettings().replace(height=64, width=64, num_inference_steps=2, device="cpu")
        pipeline = build_demo_pipeline()
    else:
        from lowvram_studio.models.svd_configs import build_svd_xt_pipeline

        nvml, baseline, facts = open_nvml()  # before torch touches CUDA: the idle baseline
        base = RunSettings().replace(
            height=args.height, width=args.width, num_inference_steps=args.steps, device="cuda",
            unet_dtype="fp16", vae_dtype="fp16", encoder_dtype="fp16",
        )
        start = time.perf_counter()
        pipeline = build_svd_xt_pipeline(dtype=torch.float16, device="cuda")
        logger.info("built SVD-XT (random weights, seed 0) in %.1f s", time.perf_counter() - start)
    base = base.replace(**parse_overrides(args.overrides)).validate()
    image = input_image(base.width, base.height)
    sampler_args = {"nvml_handle": nvml, "baseline_mib": baseline}

    # Warm-up (kernels, cuDNN/cuBLAS handles) so neither measured row pays for first use.
    run_case(pipeline, image, base.replace(num_inference_steps=1), "decode-all", cases[1], args.fps, sampler_args)
    rows = [
        run_case(pipeline, image, base, profile, case, args.fps, sampler_args) for profile in PROFILES for case in cases
    ]
    add_ratios(rows, reference=cases[0])

    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    report = {"env": environment(facts), "command": command, "base_settings": base.to_dict(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    table = markdown_table(rows)
    args.out.with_suffix(".md").write_text(
        f"# Interpolation bench\n\n`{command}`\n\n{json.dumps(report['env'])}\n\n{table}", encoding="utf-8"
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
