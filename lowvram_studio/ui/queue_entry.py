"""One queued job as data: its settings checked, its seeds, its output name, the speed figures for ETAs.

``job_queue.JobQueue`` keeps these entries on disk; this module says what an entry is and when a stored one
can run (``QueueEntry.from_dict``, ``EntryError`` naming the field), how a seed list expands
(``parse_seeds``), what its video is called (``output_stem``) and which earlier runs predict its time
(``Speed``, ``speed_key``, ``Estimate``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..settings import RunSettings
from ..settings_table import names
from .worker import JobState

INPUTS = "inputs"  # the queue's folder of input images, where an entry's image is
MAX_SWEEP = 64  # jobs one "Add to queue" may create


class QueueError(ValueError):
    """A queue request the user can fix (unknown job, job already running, bad seed list)."""


class EntryError(ValueError):
    """A stored queue entry that cannot be run as it is (its message names the field and the value)."""


# What defines a queued job: filling these from defaults would run another job than the one queued.
# Other settings missing (a queue of an older version) take their defaults.
JOB_SETTINGS = ("seed", "width", "height", "num_frames", "num_inference_steps")
ENTRY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # part of the output file name
INPUT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")  # a file directly in inputs/


def output_stem(entry_id: str, seed: int) -> str:
    """The name (without -2, -3 ... and .mp4) of the video a queued job writes."""
    return f"queue-{entry_id}-seed{seed}"


def _checked_settings(settings: Any) -> dict[str, Any]:
    """The stored settings as RunSettings.to_dict(): every key present, every value of its type."""
    if not isinstance(settings, dict):
        raise EntryError(f"settings must be a mapping of setting names to values; got {settings!r}")
    missing = [name for name in JOB_SETTINGS if name not in settings]
    if missing:
        raise EntryError(f"settings lack {', '.join(missing)}")
    try:
        return RunSettings.from_dict_lenient(settings)[0].validate().to_dict()
    except TypeError as exc:  # a check compared e.g. "abc" with 1.0: name the values unlike their defaults
        defaults = RunSettings().to_dict()
        odd = [f"{k}={v!r}" for k, v in settings.items() if k in defaults and _kind(v) != _kind(defaults[k])]
        raise EntryError(f"settings of the wrong type: {', '.join(odd) or exc}") from exc
    except ValueError as exc:  # SettingsError: each problem named
        raise EntryError(f"settings: {exc}") from exc


def _kind(value: Any) -> str:
    """The JSON kind of a value: number (int or float), bool, text, list, mapping or null."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else "bool"
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def parse_seeds(text: str | None, default: int) -> list[int]:
    """'1..8' -> 1..8, '1, 5, 9' -> those, '1..3, 10' -> both; empty -> [default]."""
    text = (text or "").strip()
    if not text:
        return [default]
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)\s*(?:\.\.|-)\s*(\d+)|(\d+)", part)
        if match is None:
            raise QueueError(f"seeds must look like 1..8 or 1, 5, 9; got {part!r}")
        first, last = (int(match[1]), int(match[2])) if match[3] is None else (int(match[3]), int(match[3]))
        if last < first:
            raise QueueError(f"a seed range counts up, e.g. 1..8; got {part!r}")
        if len(seeds) + last - first + 1 > MAX_SWEEP:
            raise QueueError(f"at most {MAX_SWEEP} jobs can be queued at once; got more from {text!r}")
        seeds.extend(range(first, last + 1))
    return seeds


@dataclass
class QueueEntry:
    """One queued job: everything needed to run it again after a restart."""

    id: str
    image: str  # file name in the queue's inputs/ folder
    settings: dict[str, Any]  # RunSettings.to_dict(), the seed included
    model: str  # model source: "demo", a folder, a .safetensors file
    gif: bool = False
    state: JobState = JobState.QUEUED
    video: str | None = None  # the mp4 it writes, chosen when it starts
    error: str | None = None
    note: str | None = None  # e.g. that it restarted after the studio stopped during its run
    created: float = field(default_factory=time.time)
    seconds: float | None = None  # wall time of the finished run

    @property
    def label(self) -> str:
        s = self.settings
        model = Path(self.model).name or self.model
        return (f"seed {s['seed']} · {s['width']}x{s['height']} · {s['num_frames']} frames · "
                f"{s['num_inference_steps']} steps · {model}")

    def run_settings(self) -> RunSettings:
        return RunSettings.from_dict_lenient(self.settings)[0].validate()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "QueueEntry":
        """An entry from queue.json; ``EntryError`` naming the field when it cannot be run as stored."""
        if not isinstance(data, dict):
            raise EntryError(f"an entry must be a mapping of fields to values; got {data!r}")
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        missing = [name for name in ("id", "image", "settings", "model") if name not in values]
        if missing:
            raise EntryError(f"the entry lacks {', '.join(missing)}")

        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise EntryError(f"{name} must be {expected}; got {values[name]!r}")

        check(isinstance(values["id"], str) and ENTRY_ID.fullmatch(values["id"]) is not None, "id",
              "1 to 64 letters, digits, - or _")
        check(isinstance(values["image"], str) and INPUT_NAME.fullmatch(values["image"]) is not None, "image",
              f"the name of a file in the queue's {INPUTS}/ folder")
        check(isinstance(values["model"], str) and values["model"] != "", "model", "a model source")
        for name in ("video", "error", "note"):
            check(values.get(name) is None or isinstance(values[name], str), name, "text or null")
        check(isinstance(values.get("gif", False), bool), "gif", "true or false")
        for name in ("created", "seconds"):
            value = values.get(name)
            check(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)), name,
                  "a number of seconds")
        states = ", ".join(state.value for state in JobState)
        state = values.setdefault("state", JobState.QUEUED.value)
        check(isinstance(state, str) and state in {s.value for s in JobState}, "state", f"one of {states}")
        values["state"] = JobState(state)
        values["settings"] = _checked_settings(values["settings"])
        if values.get("created") is None:
            values.pop("created", None)
        return cls(**values)


@dataclass
class Speed:
    """Measured cost of a run: seconds per denoise step plus everything else (load, encode, decode, export)."""

    seconds_per_step: float
    overhead_s: float

    def estimate(self, steps: int) -> float:
        return steps * self.seconds_per_step + self.overhead_s


# Settings that change how long a run of a given size takes (settings_table: each one's cost): precision, CFG split,
# chunks, offload, decode, windows, pruning, budget plan, interpolation, guidance; seed, motion and fps do not.
COST_FIELDS = names(cost="step") + names(cost="run")


def speed_key(model: str, settings: RunSettings | dict[str, Any], same_settings: bool = False) -> str:
    """Key of the runs whose speed predicts this one's: same model, device choice and size (width x height x
    frames), and with ``same_settings`` also the same time-changing settings (``COST_FIELDS``)."""
    s = settings.to_dict() if isinstance(settings, RunSettings) else settings
    key = f"{model}|{s['device']}|{s['width']}x{s['height']}x{s['num_frames']}"
    if same_settings:
        key += "|" + json.dumps({name: s.get(name) for name in COST_FIELDS}, sort_keys=True, default=str)
    return key


@dataclass(frozen=True)
class Estimate:
    """Seconds a queued job should take, and whether they come from a run with the same settings."""

    seconds: float
    same_settings: bool
