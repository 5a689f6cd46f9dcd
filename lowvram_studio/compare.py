"""Compare FP32 vs FP16: the same image, seed and size run three times, measured, side by side.

1. (a) FP32 original: every technique off, denoiser / VAE / conditioning encoder in fp32 (the reference).
2. (b) FP16 only: (a) with the denoiser (SVD's UNet, Wan's transformer) in fp16.
3. (c) FP16 + chosen optimizations: the user's settings with the denoiser in fp16.

The runs go one after another in this process; between them memory is released (garbage
collected, CUDA cache emptied, peaks reset) and the idle baseline re-measured and recorded.
Writes ``compare.json`` (the three run records), ``curves.png`` and ``table.md`` to a folder.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from lowvram_studio import media
from lowvram_studio.engine.events import CancelToken, EventCallback, Phase, RunEvent
from lowvram_studio.engine.placement import release_memory as free_cached_memory
from lowvram_studio.engine.preview import split_preview
from lowvram_studio.engine.precision import forget_precision
from lowvram_studio.engine.sampler import resolve_device
from lowvram_studio.engine.components import DENOISER, Component, by_role
from lowvram_studio.engine.sampler import prepare
from lowvram_studio.plan.ram import MachineRam
from lowvram_studio.settings_adapter import engine_config
from lowvram_studio.models.load import LoadedModel
from lowvram_studio.monitor.record import RunRecord, record_run, write_text_atomic
from lowvram_studio.monitor.report import compare_table_md, curves_dataframe, plot_curves, psnr_ssim
from lowvram_studio.monitor.vram import MonitorConfig, measure_idle_baseline
from lowvram_studio.plan.planner import Planner
from lowvram_studio.planned_run import PlannedRun, execute, plan_run
from lowvram_studio.settings import Precision, RunSettings, SettingsError
from lowvram_studio.settings_table import names

LOG = logging.getLogger(__name__)

FP32_LABEL = "FP32 original"
FP16_LABEL = "FP16 only"
OPTIMIZED_LABEL = "FP16 + chosen optimizations"
COLORS = {FP32_LABEL: "tab:red", FP16_LABEL: "tab:blue", OPTIMIZED_LABEL: "tab:green"}
COMPARE_FILES = ("compare.json", "curves.png", "table.md", "side_by_side.mp4")
COMPARE_VERSION = 1
# What a run makes (kept from the user's settings in every compare run); every other field is a technique.
WHAT_TO_MAKE = names("make")
# The settings run (b) "FP16 only" turns to fp16. The UNet alone follows the engine's precision
# policy (VAE and image encoder stay fp32 unless the user asks); the write-up's "FP16" cast all three.
FP16_ONLY_FIELDS = ("unet_dtype",)
TORCH_DTYPES = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}

ModelSource = LoadedModel | Callable[[], LoadedModel]


class CompareError(ValueError):
    """A compare that cannot start; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class CompareRun:
    label: str
    settings: RunSettings


@dataclass
class CompareResult:
    """The three run records (a, b, c), where they were written, the table and any caveats."""

    records: list[RunRecord]
    out_dir: Path
    files: dict[str, Path]
    table_md: str
    notes: list[str] = field(default_factory=list)

    def curves_dataframe(self) -> pd.DataFrame:
        return curves_dataframe(self.records)


def compare_runs(settings: RunSettings) -> list[CompareRun]:
    """The settings of runs (a), (b), (c) for the user's ``settings``."""
    made = {name: getattr(settings, name) for name in WHAT_TO_MAKE}
    fp32 = RunSettings(**made, unet_dtype=Precision.FP32, vae_dtype=Precision.FP32, encoder_dtype=Precision.FP32)
    # (c) keeps the user's VAE / encoder choice; "auto" there means the default, fp32.
    optimized = settings.replace(
        unet_dtype=Precision.FP16,
        vae_dtype=Precision.FP32 if settings.vae_dtype == Precision.AUTO else settings.vae_dtype,
        encoder_dtype=Precision.FP32 if settings.encoder_dtype == Precision.AUTO else settings.encoder_dtype,
    )
    return [
        CompareRun(FP32_LABEL, fp32),
        CompareRun(FP16_LABEL, fp32.replace(**dict.fromkeys(FP16_ONLY_FIELDS, Precision.FP16))),
        CompareRun(OPTIMIZED_LABEL, optimized),
    ]


def run_compare(
    model: ModelSource,
    image: Image.Image,
    settings: RunSettings,
    out_dir: str | Path,
    on_event: EventCallback | None = None,
    cancel: CancelToken | None = None,
    monitor_config: MonitorConfig | None = None,
) -> CompareResult:
    """Run (a), (b), (c) and write ``compare.json``, ``curves.png``, ``table.md`` into ``out_dir``.

    ``model`` is a loaded model (cast in place between runs; its exact weights and dtypes are
    restored at the end) or a factory called once per run (each run starts from fresh weights).
    ``out_dir`` must not hold compare files already: the compare refuses to start rather than
    overwrite them. Events reach ``on_event`` with ``data["compare_run"]`` naming the run.
    ``monitor_config`` sets the sampler; give it ``device_baseline_mib`` (measured at start-up,
    before CUDA) so process peaks have a fallback where the driver hides per-process figures.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if settings.validate().interpolate > 1:
        raise CompareError(f"compare measures the frames each run generates; interpolation (x{settings.interpolate}) "
                           "only adds frames after them, the same for every run: set interpolate to 1 for compare, "
                           "or use Generate to interpolate")
    runs = compare_runs(settings)
    for run in runs:
        _check_precision(run.settings.validate())
    notes = _precision_notes(runs)
    config = monitor_config or MonitorConfig()
    image = media.fit_image(image, settings.width, settings.height)

    reference: np.ndarray | None = None
    records: list[RunRecord] = []
    clips: list[np.ndarray] = []  # uint8 frames of each run that completed, for the side-by-side video
    with _models(model, runs) as models:
        for index, (run, loaded) in enumerate(zip(runs, models, strict=True)):
            if cancel is not None:
                cancel.raise_if_cancelled()
            emit = _tagged(on_event, run.label, index, len(runs))
            family = loaded.family
            if index == 0:  # every run has the same model and device: all are planned (and (c)'s budget applied)
                # before any runs, so a compare that cannot be honoured fails before it starts
                planned = plan_compare(loaded, runs, notes)
            denoiser = by_role(family.components, DENOISER).label
            run = CompareRun(run.label, planned[index].settings)
            emit(RunEvent(Phase.LOAD, message=f"{run.label}: preparing ({denoiser} {run.settings.unet_dtype.value})"))
            prepare(family, engine_config(run.settings), resolve_device(run.settings.device))
            release_memory()
            baseline = measure_idle_baseline(config.cuda_index)
            events: list[RunEvent] = []

            def collect(event: RunEvent, emit: EventCallback = emit, events: list[RunEvent] = events) -> None:
                events.append(split_preview(event)[0])  # a failure record keeps the events, not preview frames
                emit(event)

            try:
                result, record = record_run(
                    # no re-plan: an out-of-memory run is a result here (the write-up's "OOM" cell)
                    lambda loaded=loaded, one=planned[index], collect=collect: execute(
                        loaded, image, one, on_event=collect, cancel=cancel, replan=False),
                    run.settings,
                    model=loaded.describe(),
                    label=run.label,
                    config=config,
                    baseline=baseline,
                    record_out_of_memory=True,
                    events=events,
                )
            except RuntimeError as error:
                if "not implemented for 'Half'" not in str(error):
                    raise
                raise CompareError(
                    f"{run.label}: this PyTorch cannot run an fp16 operation on "
                    f"{resolve_device(run.settings.device).type} ({error}); run compare on a GPU"
                ) from error
            if result is not None:
                clips.append(media.to_uint8(result.frames))
            if result is not None and index == 0:
                reference = np.asarray(result.frames, dtype=np.float32)
            elif result is not None:
                _add_fidelity(record, np.asarray(result.frames, dtype=np.float32), reference, notes)
            elif index == 0:
                notes.append(f"{run.label} did not complete ({record.error}); no PSNR/SSIM against it")
            records.append(record)
            del result, loaded  # nothing may hold this run's pipeline or frames while the next one starts
            release_memory()

    return _write(records, out_dir, notes, clips, settings.fps)


def plan_compare(model: LoadedModel, runs: list[CompareRun], notes: list[str], *, planner: Planner | None = None,
                 machine: MachineRam | None = None) -> list[PlannedRun]:
    """Every run planned as Generate plans (planned_run), before any runs: (a) and (b) are the references and run
    exactly as set; (c) runs under the user's VRAM budget, whose plan goes into the notes. A run whose weights kept in
    host RAM exceed ``machine``'s RAM and swap is refused: the FP32 reference of a full-size Wan holds its
    5.7 B-parameter text encoder in fp32. ``planner``: one for other dims than the model's (tests)."""
    planned: list[PlannedRun] = []
    for run in runs:
        budgeted = run is runs[-1] and run.settings.vram_budget != "off"
        try:
            one = plan_run(model, run.settings, planner=planner, apply_plan=budgeted, machine=machine)
        except SettingsError as error:
            raise CompareError(f"{run.label}: {error}; compare's first run keeps every component in fp32, so "
                               "compare this model on a machine with more RAM, or press Generate twice at the same "
                               "seed (FP32, then FP16) and compare the two records") from error
        planner = one.planner
        if budgeted and one.plan is None:  # 'auto' without a CUDA GPU
            notes.append(f"{run.label}: no CUDA GPU, so the 'auto' budget had nothing to plan for; ran as set")
        elif budgeted:
            if one.settings.interpolate > 1:
                raise CompareError(f"{run.settings.vram_budget} fits only by generating fewer frames and "
                                   "interpolating, but compare needs the same frames from every run: pick a larger "
                                   "budget or a smaller size or frame count, or use Generate with this budget")
            notes.append(f"{run.label}, planned for {run.settings.vram_budget}: " + "; ".join(one.plan.summary()))
        planned.append(one)
    return planned


def _check_precision(settings: RunSettings) -> None:
    for field_name in ("unet_dtype", "vae_dtype", "encoder_dtype"):
        precision = getattr(settings, field_name)
        if precision not in TORCH_DTYPES:
            raise CompareError(f"compare runs fp32, fp16 or bf16; got {field_name} {precision.value}; choose one of those")


def release_memory() -> None:
    """Give back what the last run left: Python garbage, the CUDA cache, torch peaks, CPU heap pages."""
    free_cached_memory()
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    _trim_cpu_heap()


def _trim_cpu_heap() -> None:
    # glibc keeps freed heap pages mapped (tensors under its mmap threshold live there), so the RSS
    # of the next run would include the last run's; malloc_trim hands them back. Linux/glibc only.
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError) as error:
        LOG.debug("malloc_trim unavailable: %s", error)


def load_compare(path: str | Path) -> list[RunRecord]:
    """The run records of a ``compare.json`` (a file, or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "compare.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read compare results {path} ({error}); check the path or run compare again") from error
    return [RunRecord.from_dict(run) for run in data.get("runs", [])]


# ---- helpers ------------------------------------------------------------------------------------
def _check_out_dir(out_dir: Path) -> None:
    existing = [name for name in COMPARE_FILES if (out_dir / name).exists()]
    if existing:
        raise CompareError(
            f"{out_dir} already holds {', '.join(existing)}; choose another --out folder or move those files away"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise CompareError(f"{out_dir} is a file; give a folder for --out")
    out_dir.mkdir(parents=True, exist_ok=True)


def _precision_notes(runs: list[CompareRun]) -> list[str]:
    """Say up front what fp16 means on this device (CPU: it runs, through slow kernels)."""
    notes = []
    if resolve_device(runs[0].settings.device).type == "cpu":
        notes.append(
            "on CPU, fp16 runs through PyTorch's slow reference convolutions: the FP16 runs are slower "
            "than FP32 here; memory is measured as CPU RAM (peak RSS) and still shows the weight savings"
        )
    return notes


@contextmanager
def _models(source: ModelSource, runs: list[CompareRun]) -> Iterator[Iterator[LoadedModel]]:
    """One model per run: fresh from a factory, or the given one, restored exactly afterwards."""
    if not isinstance(source, LoadedModel):
        yield _fresh_models(source, len(runs))
        return
    pipeline = source.pipeline
    saved = _save_lossy_components(pipeline, source.family.components, runs)
    try:
        yield iter([source] * len(runs))
    finally:
        for component, (dtype, state) in saved.items():
            module = getattr(pipeline, component)
            module.to(dtype=dtype)
            if state is not None:
                module.load_state_dict(state)
                forget_precision(module)  # the exact weights are back: nothing is rounded any more


def _fresh_models(factory: Callable[[], LoadedModel], count: int) -> Iterator[LoadedModel]:
    for _ in range(count):
        model = factory()
        yield model
        del model  # drop this run's model before the factory builds the next


def _save_lossy_components(pipeline: Any, components: tuple[Component, ...],
                           runs: list[CompareRun]) -> dict[str, tuple[torch.dtype, Any]]:
    """Original dtypes, plus a CPU copy of weights that a run narrows (fp32 -> fp16 -> fp32 is not exact).
    A component the loader left on disk (Wan's text encoder) is read afresh by each run: nothing to keep."""
    saved = {}
    for component in components:
        module = getattr(pipeline, component.attribute)
        if module is None:
            continue
        dtype = next(module.parameters()).dtype
        narrowed = any(
            torch.finfo(TORCH_DTYPES.get(getattr(r.settings, component.setting), dtype)).bits < torch.finfo(dtype).bits
            for r in runs
        )
        state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()} if narrowed else None
        saved[component.attribute] = (dtype, state)
    return saved


def _tagged(on_event: EventCallback | None, label: str, index: int, total: int) -> EventCallback:
    def emit(event: RunEvent) -> None:
        if on_event is not None:
            tag = {"compare_run": label, "compare_index": index, "compare_total": total}
            on_event(dataclasses.replace(event, data={**event.data, **tag}))

    return emit


def _add_fidelity(record: RunRecord, frames: np.ndarray, reference: np.ndarray | None, notes: list[str]) -> None:
    if reference is None:
        return  # (a) failed (e.g. FP32 out of memory): nothing to compare against
    try:
        psnr, ssim = psnr_ssim(frames, reference)
    except ValueError as error:
        notes.append(f"{record.label}: no PSNR/SSIM ({error})")
        return
    record.results.update(psnr_db=psnr, ssim=ssim)


def side_by_side(clips: list[np.ndarray]) -> np.ndarray:
    """The runs' clips next to each other, left to right in run order, split by a white bar 8 px wide
    (8 keeps the width even, as H.264 / yuv420p wants)."""
    frames, height = clips[0].shape[0], clips[0].shape[1]
    bar = np.full((frames, height, 8, 3), 255, dtype=np.uint8)
    parts = [part for clip in clips for part in (clip, bar)][:-1]
    return np.concatenate(parts, axis=2)


def _write(records: list[RunRecord], out_dir: Path, notes: list[str], clips: list[np.ndarray],
           fps: float) -> CompareResult:
    _check_out_dir(out_dir)
    table = compare_table_md(records)
    if notes:
        table += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    data = {"version": COMPARE_VERSION, "notes": notes, "runs": [r.to_dict() for r in records]}
    files = {
        "json": write_text_atomic(out_dir / "compare.json", json.dumps(data, indent=1)),
        "png": plot_curves(records, out_dir / "curves.png", colors=COLORS, title="FP32 vs FP16: memory over time"),
        "md": write_text_atomic(out_dir / "table.md", table),
    }
    if clips:  # watched together, the runs' differences show where PSNR/SSIM only count them
        files["video"] = media.write_mp4(side_by_side(clips), out_dir / "side_by_side.mp4", fps)
    return CompareResult(records=records, out_dir=out_dir, files=files, table_md=table, notes=notes)
