"""RunSettings: every knob of a run, validated in one place, with a JSON round trip.

The CLI flags, the UI controls, the run record and the benchmarks all speak these field names
(DESIGN §7); a new engine knob is a new field here, never a renamed one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .engine.options import DeviceChoice, HalfCompute, OffloadMode, Precision, PruneMode, WindowBlend
from .settings_table import lossy_names, renamed


class SettingsError(ValueError):
    """Raised with every problem found, each phrased as 'what is wrong; what to do'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class SettingsTypeError(SettingsError, TypeError):
    """A value that is not of its field's type (``"abc"`` for a number, ``true`` for a seed).

    Also a ``TypeError``, so code that caught the TypeError a comparison with such a value used to raise
    still catches it.
    """


BUDGET_PRESETS = ("4GB", "6GB", "8GB", "12GB", "24GB")  # the cards plan/budgets.py plans for; any size also works
VRAM_BUDGETS = ("off", "auto", *BUDGET_PRESETS)
INTERPOLATION_FACTORS = (1, 2, 4)
MAX_SIDE = 2048
MAX_FRAMES = 256
MAX_STEPS = 200
MAX_PROMPT_CHARS = 2000


@dataclass
class RunSettings:
    """Every knob of one run. Defaults suit the built-in demo model on a CPU.

    This is the table of settings: each field's annotation is the type its values are checked against
    (``type_problems``), so a new knob is checked by declaring it.
    """

    # What to make
    height: int = 128
    width: int = 128
    num_frames: int = 14
    num_inference_steps: int = 20
    seed: int = 0
    fps: int = 7  # SVD's fps conditioning; also the frame rate of the written video
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 3.0
    # What to make, for families steered by text (Wan); SVD takes only the image
    prompt: str = ""
    negative_prompt: str = ""
    guidance_scale: float = 5.0  # Wan's classifier-free guidance (SVD's is min/max_guidance_scale per frame)
    device: DeviceChoice = DeviceChoice.AUTO

    # Precision (engine/precision.py)
    unet_dtype: Precision = Precision.AUTO
    vae_dtype: Precision = Precision.FP32
    encoder_dtype: Precision = Precision.FP32
    half_compute: HalfCompute = HalfCompute.AUTO

    # Lossless chunking (engine/chunking.py); 0 = off
    cfg_split: bool = False
    spatial_chunk: int = 0  # frames per chunk in spatial layers
    temporal_chunk: int = 0  # spatial positions per chunk in temporal layers
    ff_chunk: int = 0  # tokens per chunk in feed-forward layers

    # Placement (engine/placement.py)
    offload: OffloadMode = OffloadMode.NONE

    # Decode (engine/vae.py); decode_frames 0 = all frames at once, vae_tile 0 = no tiling
    decode_frames: int = 0
    vae_tile: int = 0

    # Temporal windows (engine/windows.py); window_frames 0 = the whole clip at once
    window_frames: int = 0
    overlap: int = 2
    window_blend: WindowBlend = WindowBlend.PYRAMID

    # Static-frame pruning / feature reuse (engine/pruning.py); 0 = off
    prune_threshold: float = 0.0
    prune_mode: PruneMode = PruneMode.STEPS

    # Planning and delivery
    vram_budget: str = "off"
    interpolate: int = 1

    # Live latent preview (engine/preview.py): a preview every N denoise steps; 0 = off
    preview_every: int = 1

    extra: dict[str, Any] = field(default_factory=dict)

    # ---- validation -------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every problem with these settings, as user-facing sentences (empty when valid).

        Types first: while a value is not of its field's type, only the type problems are listed, since
        the value checks below compare numbers.
        """
        typed = type_problems(self._values())
        if typed:
            return typed
        out: list[str] = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                out.append(message)

        for name in ("height", "width"):
            value = getattr(self, name)
            check(
                # the finest any family takes (Wan2.1: 16); each family's own multiple: settings_adapter.request_for
                isinstance(value, int) and value % 16 == 0 and 64 <= value <= MAX_SIDE,
                f"{name} must be a multiple of 16 between 64 and {MAX_SIDE}; got {value!r}",
            )
        check(
            isinstance(self.num_frames, int) and 2 <= self.num_frames <= MAX_FRAMES,
            f"num_frames must be between 2 and {MAX_FRAMES}; got {self.num_frames!r}",
        )
        check(
            isinstance(self.num_inference_steps, int) and 1 <= self.num_inference_steps <= MAX_STEPS,
            f"num_inference_steps must be between 1 and {MAX_STEPS}; got {self.num_inference_steps!r}",
        )
        check(
            isinstance(self.seed, int) and 0 <= self.seed < 2**63,
            f"seed must be a whole number from 0 to 2**63-1; got {self.seed!r}",
        )
        check(isinstance(self.fps, int) and 1 <= self.fps <= 60, f"fps must be between 1 and 60; got {self.fps!r}")
        check(
            isinstance(self.motion_bucket_id, int) and 0 <= self.motion_bucket_id <= 1023,
            f"motion_bucket_id must be between 0 and 1023; got {self.motion_bucket_id!r}",
        )
        check(
            0.0 <= self.noise_aug_strength <= 1.0,
            f"noise_aug_strength must be between 0 and 1; got {self.noise_aug_strength!r}",
        )
        check(
            0.0 <= self.min_guidance_scale <= 20.0 and 0.0 <= self.max_guidance_scale <= 20.0,
            "guidance scales must be between 0 and 20; got "
            f"min {self.min_guidance_scale!r}, max {self.max_guidance_scale!r}",
        )
        check(
            0.0 <= self.guidance_scale <= 20.0,
            f"guidance_scale must be between 0 and 20 (1 or less turns guidance off); got {self.guidance_scale!r}",
        )
        for name in ("prompt", "negative_prompt"):
            check(len(getattr(self, name)) <= MAX_PROMPT_CHARS,
                  f"{name} must be at most {MAX_PROMPT_CHARS} characters; got {len(getattr(self, name))}; shorten it")
        check(
            self.min_guidance_scale <= self.max_guidance_scale,
            f"min_guidance_scale ({self.min_guidance_scale}) must not exceed max_guidance_scale "
            f"({self.max_guidance_scale}); lower the minimum or raise the maximum",
        )
        for name in ("spatial_chunk", "temporal_chunk", "ff_chunk", "decode_frames"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, f"{name} must be 0 (off) or a positive whole number; got {value!r}")
        check(
            isinstance(self.vae_tile, int) and (self.vae_tile == 0 or (self.vae_tile >= 64 and self.vae_tile % 8 == 0)),
            f"vae_tile must be 0 (off) or a multiple of 8 of at least 64 pixels; got {self.vae_tile!r}",
        )
        check(
            isinstance(self.window_frames, int) and (self.window_frames == 0 or self.window_frames >= 2),
            f"window_frames must be 0 (whole clip) or at least 2 frames; got {self.window_frames!r}",
        )
        if self.window_frames:
            check(
                isinstance(self.overlap, int) and 0 <= self.overlap < self.window_frames,
                f"overlap must be at least 0 and smaller than window_frames ({self.window_frames}); got {self.overlap!r}",
            )
        check(
            0.0 <= self.prune_threshold <= 1.0,
            f"prune_threshold must be between 0 (off) and 1; got {self.prune_threshold!r}",
        )
        check(
            not (self.prune_threshold > 0 and 0 < self.window_frames < self.num_frames),
            "pruning (prune_threshold) and temporal windows (window_frames) cannot be combined yet; "
            "set prune_threshold to 0 or window_frames to 0",
        )
        check(
            self.vram_budget in VRAM_BUDGETS or _parse_gib(self.vram_budget) is not None,
            f"vram_budget must be one of {', '.join(VRAM_BUDGETS)} or a size such as 5GB; got {self.vram_budget!r}",
        )
        check(
            isinstance(self.preview_every, int) and not isinstance(self.preview_every, bool)
            and 0 <= self.preview_every <= MAX_STEPS,
            f"preview_every must be 0 (no live preview) or a number of steps from 1 to {MAX_STEPS}; "
            f"got {self.preview_every!r}",
        )
        check(
            self.interpolate in INTERPOLATION_FACTORS,
            f"interpolate must be 1, 2 or 4; got {self.interpolate!r}",
        )
        out.extend(_pruning_problems(self))
        return out

    def validate(self) -> "RunSettings":
        """Raise ``SettingsError`` listing every problem; return self when valid."""
        found = self.problems()
        if found:
            raise (SettingsTypeError if type_problems(self._values()) else SettingsError)(found)
        return self

    def _values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # ---- derived ------------------------------------------------------------------------------
    @property
    def guidance_enabled(self) -> bool:
        """SVD runs classifier-free guidance when the maximum scale exceeds 1 (as diffusers does)."""
        return self.max_guidance_scale > 1.0

    def lossy_settings(self) -> list[str]:
        """Names of the settings that change the output against the reference run (DESIGN §3; settings_table)."""
        return lossy_names(self)

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in data.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSettings":
        """Build settings from a dict; unknown keys are an error naming them (see ``from_dict_lenient``)."""
        data = _today(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError([f"unknown setting(s) {', '.join(unknown)}; remove them or update LowVRAM Studio"])
        return cls(**_coerce(data))

    @classmethod
    def from_dict_lenient(cls, data: dict[str, Any]) -> tuple["RunSettings", list[str]]:
        """Like ``from_dict`` but ignores unknown keys, returning their names (records of other versions)."""
        data = _today(data)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**_coerce({k: v for k, v in data.items() if k in known})), sorted(set(data) - known)

    @classmethod
    def from_json(cls, text: str) -> "RunSettings":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "RunSettings":
        return dataclasses.replace(self, **_coerce(changes))

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")


# What a value of each field type must be, in the user's words.
_EXPECTED = {
    bool: "true or false (bool)",
    int: "a whole number (int)",
    float: "a number (float)",
    str: "text (str)",
    dict: "an object of named values (dict)",
}


@functools.cache
def field_types() -> dict[str, type]:
    """Each RunSettings field's type from its annotation: bool, int, float, str, dict or an Enum class."""
    hints = typing.get_type_hints(RunSettings)
    return {f.name: typing.get_origin(hints[f.name]) or hints[f.name] for f in dataclasses.fields(RunSettings)}


def type_problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be the value of field ``name``, or None when it is of the field's type.

    A bool is not a number (``true`` is no seed), a whole number is a float's value, an Enum field takes its
    member or one of the member's strings in any case.
    """
    kind = field_types()[name]
    if issubclass(kind, Enum):
        if isinstance(value, kind) or (isinstance(value, str) and value.lower() in {e.value for e in kind}):
            return None
        expected = "one of " + ", ".join(e.value for e in kind)
    else:
        ok = isinstance(value, (int, float) if kind is float else kind)
        if ok and (kind is bool or not isinstance(value, bool)):
            return None
        expected = _EXPECTED[kind]
    return f"{name} must be {expected}; got {_shown(value)}"


def type_problems(data: dict[str, Any]) -> list[str]:
    """``type_problem`` of each known field in ``data``, in the table's order."""
    return [problem for name in field_types() if name in data and (problem := type_problem(name, data[name]))]


def _shown(value: Any) -> str:
    """A value as the JSON of a settings file spells it, with its type: ``"abc" (str)``, ``true (bool)``."""
    if value is None:
        return "null"
    try:
        text = json.dumps(value.value if isinstance(value, Enum) else value)
    except (TypeError, ValueError):
        text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _coerce(data: dict[str, Any]) -> dict[str, Any]:
    """Check each value against its field's type (``SettingsTypeError`` listing every mismatch), then turn
    enum strings into enums and whole numbers given for a float into floats."""
    problems = type_problems(data)
    if problems:
        raise SettingsTypeError(problems)
    out = dict(data)
    for name, value in data.items():
        kind = field_types().get(name)
        if kind is not None and issubclass(kind, Enum) and not isinstance(value, kind):
            out[name] = kind(value.lower())
        elif kind is float:
            out[name] = float(value)
    return out


def _today(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` under today's field names: records and settings files of 0.1.0 say chunk_size, decode_chunk."""
    try:
        return renamed(data, "these settings")
    except ValueError as error:
        raise SettingsError([str(error)]) from None


def _pruning_problems(settings: RunSettings) -> list[str]:
    """The finer pruning knobs in ``extra`` (prune_step_signal, ...) as the engine reads them, so a bad one
    is refused with the other problems instead of failing the run. The engine owns their meaning; its
    import is deferred so reading a settings file needs no torch."""
    if not any(key.startswith("prune_") for key in settings.extra):
        return []
    from .engine.pruning_config import PruningConfig

    try:
        PruningConfig.from_knobs(settings.prune_threshold, settings.prune_mode, settings.extra)
    except ValueError as error:
        return [f"{error}; fix it in the settings' extra or remove the key"]
    return []


def _parse_gib(text: str) -> float | None:
    """'5GB' / '5.5gb' / '6' -> GiB as float; None if it is not a size."""
    cleaned = str(text).strip().lower().removesuffix("gib").removesuffix("gb").strip()
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if 0.5 <= value <= 1024 else None


def budget_gib(vram_budget: str) -> float | None:
    """The budget in GiB for a fixed budget string, None for 'off' and 'auto'."""
    if vram_budget in ("off", "auto"):
        return None
    return _parse_gib(vram_budget)
