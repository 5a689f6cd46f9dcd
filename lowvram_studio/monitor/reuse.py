"""Use a past run's settings again: restore its settings (seed included), model and input image from its
run record (.json) or from the compact record embedded in the mp4's comment tag.

Split from ``record.py``, which writes and reads whole run records; this module only reads back what
reproduces a run, and writes the compact record an mp4 carries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowvram_studio.monitor.record import RECORD_VERSION, RunRecord, jsonable

if TYPE_CHECKING:
    from lowvram_studio.settings import RunSettings

REUSE_KIND = "lowvram-studio run"  # marks the compact record embedded in an mp4's comment tag
REUSE_KEYS = ("kind", "version", "settings", "model", "input")
MODEL_REUSE_KEYS = ("name", "source", "kind")
# Read caps, checked with stat() before a byte is read: a crafted record must not make the studio hold a
# 2 GB file in memory. An input image of MAX_INPUT_PIXELS (100 MP) as PNG is well under 256 MiB; a run
# record with an hour of memory samples is a few MiB.
MAX_RECORDED_IMAGE_BYTES = 256 * 2**20
MAX_RECORD_BYTES = 64 * 2**20
HASH_CHUNK_BYTES = 2**20


class ReuseError(ValueError):
    """A file that cannot give back a run's settings; the message says what to drop instead."""


def input_image_info(path: str | Path | None) -> dict[str, Any]:
    """The record's ``input`` entry: where the input image was and a hash of its bytes (to notice edits)."""
    if path is None:
        return {}
    path = Path(path).resolve()
    return {"image": str(path), "sha256": file_sha256(path)}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file read in 1 MiB chunks, so hashing never holds the whole file in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def reuse_comment(settings: "RunSettings", model: dict[str, Any], input_info: dict[str, Any]) -> str:
    """One line of JSON holding what reproduces a run (settings, seed, model, input) for an mp4's comment tag."""
    payload = {
        "kind": REUSE_KIND,
        "version": RECORD_VERSION,
        "settings": settings.to_dict(),
        "model": {k: model[k] for k in MODEL_REUSE_KEYS if k in model},
        "input": input_info,
    }
    return json.dumps(jsonable(payload), separators=(",", ":"), sort_keys=True)


@dataclass
class ReusedRun:
    """What "use these settings again" restores from a record: the model, every setting (seed included), the image."""

    settings: "RunSettings"
    model: str
    image: Path | None
    origin: str  # where it came from, for messages: "out.json", "out.mp4 (its embedded record)"
    notes: list[str] = field(default_factory=list)  # unknown, missing or newer fields
    image_note: str | None = None  # why the input image is not restored, or that it changed

    def summary(self) -> str:
        s = self.settings
        return (f"Restored from {self.origin}: model {self.model}, seed {s.seed}, {s.width}x{s.height}, "
                f"{s.num_frames} frames, {s.num_inference_steps} steps and every other setting"
                + (f"; input image {self.image.name}" if self.image else ""))


def reuse_from_dict(data: Any, origin: str, image_folders: Sequence[Path] | None = None) -> ReusedRun:
    """Settings, model and input of a run record (full record or the mp4's compact one), of any version.

    Fields this version does not know are ignored and named in one note; fields the record lacks take
    their defaults, also named, so the user knows what could not be restored exactly. ``image_folders``:
    see ``load_reuse``.
    """
    from lowvram_studio.settings import RunSettings, SettingsError
    from lowvram_studio.settings_table import RENAMED

    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise ReuseError(f"{origin} is not a LowVRAM Studio run record (it has no settings); "
                         "drop an mp4 made by the studio or its .json record")
    notes = []
    version = data.get("version")
    if isinstance(version, int) and version > RECORD_VERSION:
        notes.append(f"the record is from a newer LowVRAM Studio (record version {version}, this one reads "
                     f"{RECORD_VERSION}); update to restore it exactly")
    try:
        settings, unknown = RunSettings.from_dict_lenient(data["settings"])
        settings.validate()
    except SettingsError as exc:
        raise ReuseError(f"the settings in {origin} are not valid here ({exc}); fix the record or pick another run") from exc
    known_top = set(REUSE_KEYS) | {f.name for f in dataclasses.fields(RunRecord)}
    ignored = [f"settings.{name}" for name in unknown] + sorted(k for k in data if k not in known_top)
    if ignored:
        notes.append("ignored fields it does not know: " + ", ".join(ignored))
    defaults = RunSettings().to_dict()
    given = {RENAMED.get(name, name) for name in data["settings"]}  # 0.1.0's names count as today's
    missing = [f"{name}={defaults[name]}" for name in defaults if name not in given]
    if missing:
        notes.append("fields missing from the record took their defaults: " + ", ".join(missing))
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    source = model.get("source") or model.get("name")
    if not source:
        notes.append("the record names no model; the built-in demo model is used")
    image, image_note = _recorded_image(data.get("input"), image_folders)
    return ReusedRun(settings, str(source or "demo"), image, origin, notes, image_note)


def _recorded_image(info: Any, image_folders: Sequence[Path] | None) -> tuple[Path | None, str | None]:
    """The recorded input image when it may be read and is still there, and a note when not or when it changed.

    With ``image_folders`` (the studio) a path outside them is never touched, and its note is the one a
    missing file gets: a caller cannot read the server's files, nor learn which paths exist.
    """
    if not isinstance(info, dict) or not info.get("image"):
        return None, "the record does not name its input image; choose the image yourself"
    if not isinstance(info["image"], str):
        shown = json.dumps(info["image"], default=repr)[:60]
        return None, (f"its input image is recorded as {shown} ({type(info['image']).__name__}), not a file path; "
                      "choose the image yourself")
    path = Path(info["image"])
    try:
        if image_folders is not None:
            if not _inside(path, image_folders) or not path.is_file():
                return None, (f"its input image {path} is not available to the studio (it reads back only images "
                              "uploaded to it or saved in its output folder); choose the image yourself")
        elif not path.is_file():
            return None, f"its input image {path} no longer exists; choose the image yourself"
        size = path.stat().st_size
        if size > MAX_RECORDED_IMAGE_BYTES:
            return None, (f"its input image {path} is {size / 2**20:.0f} MiB, larger than the "
                          f"{MAX_RECORDED_IMAGE_BYTES // 2**20} MiB read back; choose the image yourself")
        changed = bool(info.get("sha256")) and file_sha256(path) != info["sha256"]
    except OSError as exc:  # a name longer than the file system allows (is_file() raises), no permission, ...
        return None, f"its input image {path} cannot be read ({exc.strerror or exc}); choose the image yourself"
    if changed:
        return path, f"its input image {path} changed since that run, so the frames will differ"
    return path, None


def _inside(path: Path, folders: Sequence[Path]) -> bool:
    """Whether ``path``, links and ``..`` resolved, lies in one of ``folders`` (also resolved)."""
    real = path.resolve()
    return any(real.is_relative_to(Path(folder).resolve()) for folder in folders)


def load_reuse(path: str | Path, image_folders: Sequence[Path] | None = None) -> ReusedRun:
    """Read what to restore from a run record (.json) or an output video (.mp4: its embedded record, else
    the record beside it).

    ``image_folders``: the only folders the record's input image may be read from (the studio: its upload
    and served folders, as a record may come from anyone); None reads any local path (the CLI, run by the
    user on their own files). Either way the image is size-checked before it is read.
    """
    from lowvram_studio.media import MediaError, read_mp4_comment

    path = Path(path)
    if not path.is_file():
        raise ReuseError(f"{path} does not exist or is not a file; check the path")
    suffix = path.suffix.lower()
    if suffix == ".json":
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise ReuseError(f"{path.name} is larger than the {MAX_RECORD_BYTES // 2**20} MiB a run record can be; "
                             "drop a run record saved by LowVRAM Studio")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ReuseError(f"{path.name} is not readable JSON ({exc}); drop a run record saved by LowVRAM Studio") from exc
        return reuse_from_dict(data, path.name, image_folders)
    if suffix in (".mp4", ".m4v", ".mov"):
        try:
            comment = read_mp4_comment(path)
        except MediaError as exc:
            raise ReuseError(str(exc)) from exc
        embedded = _parse_embedded(comment)
        if embedded is not None:
            return reuse_from_dict(embedded, f"{path.name} (its embedded record)", image_folders)
        sibling = path.with_suffix(".json")
        if sibling.is_file():
            return load_reuse(sibling, image_folders)
        raise ReuseError(f"{path.name} carries no LowVRAM Studio record and has no {sibling.name} beside it; "
                         "drop a video made by the studio, or its .json record")
    raise ReuseError(f"{path.name} is neither an output video (.mp4) nor a run record (.json); "
                     "drop an mp4 made by LowVRAM Studio or its .json record")


def _parse_embedded(comment: str | None) -> dict[str, Any] | None:
    if not comment:
        return None
    try:
        data = json.loads(comment)
    except json.JSONDecodeError:
        return None  # someone else's comment
    return data if isinstance(data, dict) and data.get("kind") == REUSE_KIND else None
