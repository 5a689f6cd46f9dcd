"""What does pruning / feature reuse buy, and what does it cost in fidelity? (issue 6, target P4)

Full-size SVD-XT with random weights seeded 0, fp16 (UNet, VAE, image encoder), CFG on, 25 steps,
decode included (decode_frames 8). Every pruned run is compared with the unpruned run of the same
input in the same process: denoise speedup (wall time of the denoise phase) and PSNR / SSIM of the
decoded frames. Inputs:

  still     a flat, smooth image with motion_bucket_id 1 (SVD's low motion bucket)
  moving    a high-contrast textured image with motion_bucket_id 255
  same-latent (case A, frames and both modes) the still input started from one latent copied to
            every frame: the clip a static scene would give, what across-frames reuse is for

Random weights: the UNet is no denoiser, so motion buckets and inputs do not give the motion a
trained model would; speed and the mechanics are real, fidelity figures are only indicative.
Case A runs the full threshold matrix on the still input plus variants (other signals, reuse
caps, motion-adaptive, DeepCache's uniform schedule as the speed ceiling); case B and the moving
input run fewer rows. Also measured (case A, "signal_probes"): which step signal predicts the change
of the reused deep feature and of the UNet output (every step computed). Rows past --budget-s are
skipped and listed.

    python bench/pruning.py --out bench/results/pruning_YYYYMMDD.json    # H100, about 6 minutes
    python bench/pruning.py --smoke --out /tmp/pruning_smoke.json        # demo model on the CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowvram_studio.engine.events import Phase, RunEvent  # noqa: E402
from lowvram_studio.settings_adapter import RunResult, generate  # noqa: E402
from lowvram_studio.settings import RunSettings  # noqa: E402
from lowvram_studio.sysinfo import collect_env  # noqa: E402

logger = logging.getLogger("bench.pruning")
MIB = 2**20
THRESHOLDS_A = (0.004, 0.008, 0.012, 0.02, 0.03, 0.05)
THRESHOLDS_B = (0.012, 0.03)


@dataclass(frozen=True)
class Case:
    name: str
    height: int
    width: int
    frames: int
    steps: int


@dataclass(frozen=True)
class Job:
    """One pruned run of the matrix, compared with the unpruned run of its input."""

    case: Case
    input: str
    mode: str
    threshold: float
    extra: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def config(self) -> str:
        return f"prune-{self.mode}{'-' + self.label if self.label else ''}"


def make_image(kind: str, width: int, height: int) -> PIL.Image.Image:
    """still: smooth gradient; moving: checkerboard with a disc (high contrast, lots of edges)."""
    y, x = np.mgrid[0:height, 0:width]
    if kind == "moving":
        checker = ((x // 32 + y // 32) % 2).astype(float)
        disc = ((x - width * 0.6) ** 2 + (y - height * 0.4) ** 2 < (min(width, height) * 0.2) ** 2).astype(float)
        rgb = np.stack([checker, 1 - checker, disc], axis=-1)
    else:
        rgb = np.stack([x / width, y / height, np.full(x.shape, 0.5)], axis=-1)
    return PIL.Image.fromarray((rgb * 255).astype(np.uint8))


def base_settings(case: Case, kind: str, device: str, fp16: bool) -> RunSettings:
    precision = "fp16" if fp16 else "fp32"
    fields = {
        "height": case.height,
        "width": case.width,
        "num_frames": case.frames,
        "num_inference_steps": case.steps,
        "seed": 0,
        "motion_bucket_id": 255 if kind == "moving" else 1,
        "device": device,
        "unet_dtype": precision,
        "vae_dtype": precision,
        "encoder_dtype": precision,
        "decode_frames": 8,
    }
    return RunSettings.from_dict(fields)  # from_dict turns the enum strings into enums


def fidelity(reference: np.ndarray, frames: np.ndarray) -> tuple[float | None, float]:
    """PSNR (dB) over the whole clip and mean per-frame SSIM, both on [0, 1] frames (DESIGN §3).

    Identical clips give PSNR None (infinite; JSON has no infinity) and SSIM 1.
    """
    if np.array_equal(reference, frames):
        return None, 1.0
    psnr = float(peak_signal_noise_ratio(reference, frames, data_range=1.0))

    def ssim(i: int) -> float:
        return structural_similarity(reference[i], frames[i], channel_axis=-1, data_range=1.0)

    with ThreadPoolExecutor(max_workers=8) as pool:
        values = list(pool.map(ssim, range(len(frames))))
    return psnr, float(np.mean(values))


class Runner:
    """Runs one setting and measures denoise time and torch peaks (whole run and up to the end of denoise)."""

    def __init__(self, pipeline, device: str):
        self.pipeline = pipeline
        self.cuda = device == "cuda"

    def run(self, image, settings: RunSettings, latents: torch.Tensor | None = None) -> tuple[RunResult, dict]:
        peaks: dict[str, float | None] = {"denoise_torch_peak_mib": None, "torch_peak_mib": None}
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

        def on_event(event: RunEvent) -> None:
            if self.cuda and event.phase == Phase.DECODE:  # decode starts: the denoise peak is complete
                peaks["denoise_torch_peak_mib"] = torch.cuda.max_memory_allocated() / MIB

        result = generate(self.pipeline, image, settings, on_event=on_event, latents=latents)
        if self.cuda:
            peaks["torch_peak_mib"] = torch.cuda.max_memory_allocated() / MIB
        return result, peaks


def log_agreement(signal: list[float | None], target: list[float | None]) -> dict[str, float | None]:
    """How well a signal predicts a target's change over steps: Pearson r of the logs, and the spread
    (std) of log(target / signal); a small spread means one threshold bounds the reuse error at every step."""
    pairs = [(x, y) for x, y in zip(signal, target) if x and y]
    if len(pairs) < 3:
        return {"log_r": None, "log_ratio_std": None}
    x, y = np.log(np.array(pairs)).T
    r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else None
    return {"log_r": r, "log_ratio_std": float((y - x).std())}


def probe(runner: "Runner", settings: RunSettings, image: PIL.Image.Image) -> dict[str, Any]:
    """Every step computed with the step signals recorded: which one tracks the deep feature's change?"""
    settings = settings.replace(
        prune_threshold=0.012, prune_mode="steps",
        extra={"prune_max_reuse": 0, "prune_record_signals": True, "prune_branch_layers": None},
    )
    result, _ = runner.run(image, settings)
    signals = result.info["pruning"]["signals"]
    series = {name: [s[name] for s in signals] for name in ("input", "shallow", "deep", "output")}
    found = {
        "case": "A",
        "input": "still",
        "series": series,
    }
    for signal in ("input", "shallow"):
        for target in ("deep", "output"):
            found[f"{signal}_vs_{target}"] = log_agreement(series[signal], series[target])
    logger.info("signal probe: %s", {k: v for k, v in found.items() if "_vs_" in k})
    return found


def matrix(case: Case, thresholds: tuple[float, ...], frame_thresholds: tuple[float, ...], kind: str) -> list[Job]:
    """Steps and both modes at every threshold, frames mode at ``frame_thresholds``."""
    jobs = [Job(case, kind, mode, t) for t in thresholds for mode in ("steps", "both")]
    return jobs + [Job(case, kind, "frames", t) for t in frame_thresholds]


def variants(case: Case, kind: str) -> list[Job]:
    """The alternative signals and a tighter reuse cap, at the default threshold."""
    return [
        Job(case, kind, "frames", 0.012, {"prune_frame_signal": "denoised"}, "denoised-signal"),
        Job(case, kind, "steps", 0.012, {"prune_step_signal": "input"}, "input-signal"),
        Job(case, kind, "steps", 0.012, {"prune_max_reuse": 2}, "cap2"),
        Job(case, kind, "steps", 0.05, {"prune_max_reuse": 5}, "cap5"),
        Job(case, kind, "both", 0.03, {"prune_motion_adaptive": True}, "motion-adaptive"),
        # threshold 1 reuses whenever the cap allows: DeepCache's uniform interval 3, the speed ceiling
        Job(case, kind, "steps", 1.0, {"prune_max_reuse": 2}, "uniform-deepcache-n3"),
        Job(case, kind, "steps", 1.0, {"prune_max_reuse": 3}, "uniform-deepcache-n4"),
    ]


def branches(case: Case, kind: str) -> list[Job]:
    """DeepCache's branch depth: keep 1 or 0 (conv_in only) layers of the first down block instead of all."""
    jobs = []
    for layers in (1, 0):
        label = f"branch{layers}"
        jobs += [
            Job(case, kind, "steps", 0.012, {"prune_branch_layers": layers}, label),
            Job(case, kind, "steps", 0.05, {"prune_branch_layers": layers, "prune_max_reuse": 5}, f"{label}-cap5"),
            Job(case, kind, "steps", 1.0, {"prune_branch_layers": layers, "prune_max_reuse": 2}, f"{label}-uniform-n3"),
            Job(case, kind, "steps", 1.0, {"prune_branch_layers": layers, "prune_max_reuse": 3}, f"{label}-uniform-n4"),
        ]
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON path; a .md table is written next to it")
    parser.add_argument("--smoke", action="store_true", help="demo model on the CPU, tiny sizes (logic check)")
    parser.add_argument("--budget-s", type=float, default=400.0, help="skip the remaining rows after this")
    parser.add_argument("--skip-b", action="store_true", help="case A only")
    parser.add_argument(
        "--only-branches", action="store_true", help="only the branch-depth rows (and their unpruned references)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()

    if args.smoke:
        from lowvram_studio.models.demo import build_demo_pipeline

        pipeline, device, fp16 = build_demo_pipeline(), "cpu", False
        case_a, case_b = Case("A", 64, 64, 4, 4), Case("B", 64, 128, 4, 4)
        thresholds_a, thresholds_b = (0.012, 0.03, 0.05), (0.03,)
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA GPU; run with --smoke for the CPU logic check", file=sys.stderr)
            return 2
        from lowvram_studio.models.svd_configs import build_svd_xt_pipeline

        pipeline, device, fp16 = build_svd_xt_pipeline(dtype=torch.float16, device="cuda"), "cuda", True
        case_a, case_b = Case("A", 512, 512, 24, 25), Case("B", 576, 1024, 25, 25)
        thresholds_a, thresholds_b = THRESHOLDS_A, THRESHOLDS_B
    logger.info("model ready after %.1f s", time.perf_counter() - started)
    runner = Runner(pipeline, device)

    # Warm up kernels and allocator at case A's shape (not measured).
    warm = base_settings(case_a, "still", device, fp16).replace(num_inference_steps=2)
    runner.run(make_image("still", case_a.width, case_a.height), warm)

    rows: list[dict[str, Any]] = []
    references: dict[tuple[str, str], tuple[RunResult, dict]] = {}

    def reference(case: Case, kind: str, latents: torch.Tensor | None = None) -> tuple[RunResult, dict]:
        key = (case.name, kind)
        if key not in references:
            settings = base_settings(case, "still" if kind == "same-latent" else kind, device, fp16)
            image = make_image("still" if kind == "same-latent" else kind, case.width, case.height)
            result, peaks = runner.run(image, settings, latents)
            references[key] = (result, peaks)
            rows.append(row_for(case, kind, "unpruned", 0.0, result, peaks, result, peaks))
        return references[key]

    def row_for(case, kind, config, threshold, result, peaks, ref: RunResult, ref_peaks: dict) -> dict[str, Any]:
        info = result.info.get("pruning", {})
        denoise = result.phase_seconds[Phase.DENOISE.value]
        ref_denoise = ref.phase_seconds[Phase.DENOISE.value]
        psnr, ssim = (None, None) if result is ref else fidelity(ref.frames, result.frames)
        identical = result is not ref and ssim == 1.0 and psnr is None
        row = {
            "case": case.name,
            "input": kind,
            "config": config,
            "threshold": threshold,
            "steps": case.steps,
            "frames": case.frames,
            "seconds_denoise": denoise,
            "seconds_per_step": denoise / case.steps,
            "speedup_denoise": ref_denoise / denoise,
            "speedup_estimate_flops": info.get("speedup_estimate"),
            "psnr_db": psnr,
            "ssim": ssim,
            "identical_to_reference": identical,
            "pruned_fraction": info.get("pruned_fraction", 0.0),
            "neighbour_fraction": info.get("neighbour_fraction", 0.0),
            "previous_step_fraction": info.get("previous_step_fraction", 0.0),
            "reused_steps": info.get("reused_steps", 0),
            "cache_mib": info.get("cache_mib"),
            "process_peak_mib": None,  # NVML sampling is the monitor's job; torch peaks below
            "torch_peak_mib": peaks["torch_peak_mib"],
            "denoise_torch_peak_mib": peaks["denoise_torch_peak_mib"],
            "denoise_peak_delta_mib": (
                peaks["denoise_torch_peak_mib"] - ref_peaks["denoise_torch_peak_mib"]
                if peaks["denoise_torch_peak_mib"] is not None
                else None
            ),
            "seconds_total": result.seconds_total,
            "map": info.get("map"),
        }
        logger.info(
            "%s %-11s %-28s thr %.3f  x%.2f (est x%s)  %s dB  pruned %.0f%%",
            case.name, kind, config, threshold, row["speedup_denoise"],
            f"{row['speedup_estimate_flops']:.2f}" if row["speedup_estimate_flops"] else "-",
            f"{psnr:.1f}" if psnr is not None else ("identical" if identical else "ref"), 100 * row["pruned_fraction"],
        )
        return row

    def over_budget() -> bool:
        return time.perf_counter() - started > args.budget_s

    skipped: list[str] = []

    def run_job(job: Job, latents: torch.Tensor | None = None) -> None:
        if over_budget():
            skipped.append(f"{job.case.name}/{job.input}/{job.config}/{job.threshold}")
            return
        ref, ref_peaks = reference(job.case, job.input, latents)
        kind = "still" if job.input == "same-latent" else job.input
        settings = base_settings(job.case, kind, device, fp16).replace(
            prune_threshold=job.threshold, prune_mode=job.mode,
            extra={"prune_branch_layers": None, **job.extra},  # rows without a branch: the whole first block
        )
        result, peaks = runner.run(make_image(kind, job.case.width, job.case.height), settings, latents)
        rows.append(row_for(job.case, job.input, job.config, job.threshold, result, peaks, ref, ref_peaks))

    if args.only_branches:
        for job in branches(case_a, "still") + ([] if args.skip_b else branches(case_b, "still")):
            run_job(job)
        write_results(args, rows, [], skipped, device, time.perf_counter() - started)
        return 0

    # Case A: signal probe (every step computed, signals recorded), then the matrix; case B: fewer rows.
    probes = [probe(runner, base_settings(case_a, "still", device, fp16), make_image("still", case_a.width, case_a.height))]
    for job in matrix(case_a, thresholds_a, (0.012, 0.05), "still") + variants(case_a, "still") + branches(case_a, "still"):
        run_job(job)
    if not args.skip_b:
        for job in matrix(case_b, thresholds_b, thresholds_b[-1:], "still"):
            run_job(job)
    scale = pipeline.vae_scale_factor
    same = torch.randn(
        (1, 1, 4, case_a.height // scale, case_a.width // scale), generator=torch.Generator().manual_seed(0)
    ).repeat(1, case_a.frames, 1, 1, 1)
    for mode in ("frames", "both"):
        run_job(Job(case_a, "same-latent", mode, 0.012), latents=same)
    for job in matrix(case_a, thresholds_a[2:3] + thresholds_a[-2:-1], thresholds_a[2:3], "moving"):
        run_job(job)

    write_results(args, rows, probes, skipped, device, time.perf_counter() - started)
    return 0


def write_results(args, rows, probes, skipped, device, seconds) -> None:
    env = collect_env()
    command = "python bench/pruning.py " + " ".join(sys.argv[1:])
    payload = {
        "env": env,
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "seconds": seconds,
        "rows": rows,
        "signal_probes": probes,
        "skipped_over_budget": skipped,
        "note": "random weights: speed is real, fidelity only indicative of a trained model",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    table = markdown_table(rows, probes, skipped)
    args.out.with_suffix(".md").write_text(f"# Pruning bench ({env.get('gpu') or device})\n\n`{command}`\n\n{table}", encoding="utf-8")
    print(table)


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(rows, probes, skipped) -> str:
    lines = [
        "| case | input | config | threshold | s/step | speedup | est. (FLOPs) | PSNR dB | SSIM | pruned | "
        "from neighbour | from prev. step | denoise torch peak MiB (delta) | cache MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['input']} | {r['config']} | {r['threshold']:g} | {r['seconds_per_step']:.3f} | "
            f"{r['speedup_denoise']:.2f}x | {_fmt(r['speedup_estimate_flops'], '.2f')} | "
            f"{'identical' if r['identical_to_reference'] else _fmt(r['psnr_db'], '.1f')} | "
            f"{_fmt(r['ssim'], '.3f')} | {r['pruned_fraction']:.0%} | {r['neighbour_fraction']:.0%} | "
            f"{r['previous_step_fraction']:.0%} | {_fmt(r['denoise_torch_peak_mib'], '.0f')} "
            f"({_fmt(r['denoise_peak_delta_mib'], '+.0f')}) | "
            f"{_fmt(r['cache_mib'], '.0f')} |"
        )
    if probes:
        lines += [
            "",
            "Step signals, every step computed: log-log Pearson r and std of log(target/signal) "
            "(higher r, lower std: the signal predicts the reuse error better):",
            "",
            "| input | signal | vs deep feature: r / std | vs UNet output: r / std |",
            "|---|---|---|---|",
        ]
        for p in probes:
            for signal in ("input", "shallow"):
                deep, out = p[f"{signal}_vs_deep"], p[f"{signal}_vs_output"]
                lines.append(
                    f"| {p['input']} | {signal} | {_fmt(deep['log_r'], '.3f')} / {_fmt(deep['log_ratio_std'], '.3f')} | "
                    f"{_fmt(out['log_r'], '.3f')} / {_fmt(out['log_ratio_std'], '.3f')} |"
                )
    if skipped:
        lines += ["", f"Skipped over the time budget: {', '.join(skipped)}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
