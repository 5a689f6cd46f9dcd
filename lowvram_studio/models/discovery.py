"""Find SVD and Wan models already on disk: ComfyUI folders, the Hugging Face cache, and folders the user names.

Only plausible models are listed: diffusers folders whose ``model_index.json`` names
``StableVideoDiffusionPipeline`` or a Wan image-to-video pipeline, SVD ``.safetensors`` files whose header (read alone, a few MB at
most) holds an SVD UNet (``model.diffusion_model.`` keys with temporal ``time_stack`` layers), and ComfyUI's Wan
split files as one model: a Wan transformer with the VAE and text encoder that fit it (``models/wan_split_set.py``).
A folder whose weights are pickle only (``.bin``, ``.pt``, ``.ckpt``) is refused, not listed: loading
pickle runs whatever code it holds. Nothing is loaded and nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .safetensors_file import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, SafetensorsHeader, SingleFileError, read_header
from .svd_key_map import UNET_PREFIX
from .wan_split_set import TRANSFORMER, find_set, wan_part

logger = logging.getLogger(__name__)

SVD_PIPELINE_CLASS = "StableVideoDiffusionPipeline"
HF_REPO_PATTERNS = ("models--*stable-video-diffusion*", "models--Wan-AI--*")
COMFYUI_SUBFOLDERS = ("models/checkpoints", "models/diffusers", "models/diffusion_models", "models/unet")
MAX_DEPTH = 3  # how deep to look below each folder (ComfyUI users sort checkpoints into subfolders)
WEIGHT_COMPONENTS = ("unet", "vae", "image_encoder")
WAN_WEIGHT_COMPONENTS = ("transformer", "vae", "text_encoder")
# The pipelines a folder may name, with the components that carry its weights.
FOLDER_WEIGHTS = {
    SVD_PIPELINE_CLASS: WEIGHT_COMPONENTS,
    "WanImageToVideoPipeline": WAN_WEIGHT_COMPONENTS,
    "WanPipeline": WAN_WEIGHT_COMPONENTS,  # Wan2.2 TI2V-5B's folder; it runs as image-to-video too
}


class CandidateKind(str, Enum):
    DIFFUSERS_FOLDER = "diffusers-folder"
    SINGLE_FILE = "single-file"
    SPLIT_FILES = "comfyui-split-files"  # a Wan transformer + VAE + text encoder; ``path`` is the transformer


@dataclass(frozen=True)
class ModelCandidate:
    """A model the user can pick; ``path`` is what ``--model`` / ``load_model`` accepts."""

    name: str
    path: Path
    kind: CandidateKind
    size_bytes: int
    source: str = ""  # "comfyui", "hf-cache" or "models-dir"
    files: tuple[Path, ...] = ()  # SPLIT_FILES: the transformer, VAE and text encoder files

    def to_dict(self) -> dict:
        """JSON-ready (``lowvram-studio models --json``)."""
        return {
            "name": self.name,
            "path": str(self.path),
            "kind": self.kind.value,
            "size_bytes": self.size_bytes,
            "source": self.source,
            "files": [str(f) for f in self.files],
        }


@dataclass
class DiscoveryConfig:
    """Where to look. :meth:`from_env` fills it from ``COMFYUI_ROOT`` / ``HF_HUB_CACHE`` / ``HF_HOME``."""

    comfyui_root: Path | None = None
    hf_cache: Path | None = None
    models_dirs: list[Path] = field(default_factory=list)

    @classmethod
    def from_env(
        cls,
        models_dirs: Iterable[str | Path] = (),
        comfyui_root: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> DiscoveryConfig:
        """Explicit arguments win over the environment (a settings value beats ``COMFYUI_ROOT``)."""
        env = os.environ if environ is None else environ
        root = comfyui_root or env.get("COMFYUI_ROOT")
        return cls(
            comfyui_root=Path(root).expanduser() if root else None,
            hf_cache=hf_cache_dir(env),
            models_dirs=[Path(p).expanduser() for p in models_dirs],
        )


def hf_cache_dir(environ: Mapping[str, str]) -> Path:
    """The hub cache as huggingface_hub resolves it: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache."""
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    xdg = environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def folder_pipeline(folder: Path) -> str | None:
    """The pipeline class a diffusers folder's model_index.json names, when it is one we run (FOLDER_WEIGHTS)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        logger.debug("skipping %s: unreadable model_index.json (%s)", folder, exc)
        return None
    return name if name in FOLDER_WEIGHTS else None


def pickle_only_weights(folder: Path, components: tuple[str, ...] = WEIGHT_COMPONENTS) -> list[str]:
    """``component/file`` of each pickle weights file in a component that has no safetensors weights.

    Such a component could only be loaded with pickle (``torch.load``), which runs whatever code the
    file holds; a component with safetensors beside a ``.bin`` is fine (only the safetensors is read).
    """
    pickled = []
    for component in components:
        try:
            names = sorted(f.name for f in (folder / component).iterdir())
        except OSError:
            continue  # missing: check_model_folder names what is missing
        if not any(name.endswith(SAFETENSORS_SUFFIXES) for name in names):
            pickled += [f"{component}/{name}" for name in names if name.lower().endswith(PICKLE_SUFFIXES)]
    return pickled


def pickle_refusal(folder: Path, pickled: list[str]) -> str:
    """Why a folder with pickle-only weights is refused, and what to do instead."""
    return (f"{folder} has pickle weights only ({', '.join(pickled)}): loading them runs whatever code they "
            "contain, so LowVRAM Studio refuses them; download the model's .safetensors files instead, or "
            "convert it to safetensors once in a sandbox you trust (diffusers: load it and "
            "save_pretrained(folder, safe_serialization=True))")


def _usable_folder(folder: Path) -> bool:
    """An SVD or Wan folder that can be listed; one with pickle-only weights is skipped with a warning saying why."""
    pipeline = folder_pipeline(folder)
    if pipeline is None:
        return False
    pickled = pickle_only_weights(folder, FOLDER_WEIGHTS[pipeline])
    if pickled:
        logger.warning("not listing %s", pickle_refusal(folder, pickled))
        return False
    return True


def _is_svd(header: SafetensorsHeader) -> bool:
    return any(k.startswith(UNET_PREFIX) and ".time_stack." in k for k in header.entries)


def is_svd_single_file(path: Path) -> bool:
    """A safetensors file whose header holds an SVD UNet in the original layout (header read only)."""
    try:
        return _is_svd(read_header(path))
    except (SingleFileError, OSError) as exc:
        logger.debug("skipping %s: %s", path, exc)
        return False


def _file_candidate(path: Path, source: str) -> ModelCandidate | None:
    """An SVD single file, or a Wan transformer whose VAE and text encoder are found (else skipped, saying why)."""
    try:
        header = read_header(path)
    except (SingleFileError, OSError) as exc:
        logger.debug("skipping %s: %s", path, exc)
        return None
    if _is_svd(header):
        return ModelCandidate(path.stem, path, CandidateKind.SINGLE_FILE, header.file_size, source)
    if wan_part(header) != TRANSFORMER:
        return None
    try:
        files = find_set(header)
    except SingleFileError as exc:
        logger.warning("not listing a ComfyUI Wan model: %s", exc)
        return None
    return ModelCandidate(path.stem, path, CandidateKind.SPLIT_FILES, files.size_bytes, source, files.files)


def _folder_size(folder: Path) -> int:
    """Bytes of the files below ``folder``; HF snapshot files are symlinks, so follow them."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
    return total


def _walk(folder: Path, depth: int = MAX_DEPTH) -> Iterator[Path]:
    """``folder`` and the folders and files below it, ``depth`` levels deep, skipping hidden ones."""
    yield folder
    if depth == 0 or folder_pipeline(folder) is not None:
        return
    try:
        children = sorted(folder.iterdir())
    except OSError as exc:
        logger.debug("cannot list %s: %s", folder, exc)
        return
    for child in children:
        if child.name.startswith("."):
            continue
        if child.is_dir():
            yield from _walk(child, depth - 1)
        else:
            yield child


def _scan(folder: Path, source: str) -> Iterator[ModelCandidate]:
    if folder.is_file():
        entries: Iterable[Path] = [folder]
    elif folder.is_dir():
        entries = _walk(folder)
    else:
        logger.debug("model folder %s does not exist", folder)
        return
    for entry in entries:
        if entry.is_dir() and _usable_folder(entry):
            yield ModelCandidate(entry.name, entry, CandidateKind.DIFFUSERS_FOLDER, _folder_size(entry), source)
        elif entry.is_file() and entry.suffix.lower() in SAFETENSORS_SUFFIXES:
            candidate = _file_candidate(entry, source)
            if candidate is not None:
                yield candidate


def hf_snapshot(repo_folder: Path) -> Path | None:
    """The snapshot ``refs/main`` points at, else the newest one."""
    ref = repo_folder / "refs" / "main"
    if ref.is_file():
        snapshot = repo_folder / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = [p for p in (repo_folder / "snapshots").glob("*") if p.is_dir()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def _scan_hf_cache(cache: Path) -> Iterator[ModelCandidate]:
    if not cache.is_dir():
        return
    for repo_folder in sorted({found for pattern in HF_REPO_PATTERNS for found in cache.glob(pattern)}):
        snapshot = hf_snapshot(repo_folder)
        if snapshot is not None and _usable_folder(snapshot):
            repo_id = repo_folder.name.removeprefix("models--").replace("--", "/", 1)
            yield ModelCandidate(repo_id, snapshot, CandidateKind.DIFFUSERS_FOLDER, _folder_size(snapshot), "hf-cache")


def discover_models(config: DiscoveryConfig) -> list[ModelCandidate]:
    """Every plausible SVD and Wan model in the configured places, each once, sorted by name."""
    found: list[ModelCandidate] = []
    if config.comfyui_root is not None:
        for sub in COMFYUI_SUBFOLDERS:
            found.extend(_scan(config.comfyui_root / sub, "comfyui"))
    if config.hf_cache is not None:
        found.extend(_scan_hf_cache(config.hf_cache))
    for folder in config.models_dirs:
        found.extend(_scan(folder, "models-dir"))
    unique: dict[Path, ModelCandidate] = {}
    for candidate in found:
        unique.setdefault(candidate.path.resolve(), candidate)
    return sorted(unique.values(), key=lambda c: (c.name.lower(), str(c.path)))


def searched_places(config: DiscoveryConfig) -> list[Path]:
    """The folders :func:`discover_models` looks in, for messages."""
    places = [config.comfyui_root / sub for sub in COMFYUI_SUBFOLDERS] if config.comfyui_root else []
    if config.hf_cache is not None:
        places.append(config.hf_cache)
    return places + list(config.models_dirs)


def format_candidates(candidates: list[ModelCandidate], config: DiscoveryConfig | None = None) -> str:
    """A plain-text table for ``lowvram-studio models``; says where to put models when none are found."""
    if not candidates:
        where = ", ".join(str(p) for p in searched_places(config)) if config else "the configured folders"
        return (
            f"No SVD models found (looked in: {where}).\n"
            "Add one with --models-dir DIR, set COMFYUI_ROOT to your ComfyUI folder, or pass "
            "--model PATH (a diffusers SVD or Wan folder, svd_xt.safetensors, or ComfyUI's "
            "wan2.2_ti2v_5B_fp16.safetensors). The built-in 'demo' model always works."
        )
    rows = [("NAME", "KIND", "SIZE", "FROM", "PATH")]
    rows += [(c.name, c.kind.value, f"{c.size_bytes / 2**30:.1f} GiB", c.source, str(c.path)) for c in candidates]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    for index, candidate in reversed(list(enumerate(candidates, start=1))):
        if candidate.files:  # the VAE and text encoder --model PATH brings along, under its row
            lines.insert(index + 1, f"    with {', '.join(str(f) for f in candidate.files[1:])}")
    return "\n".join(lines)
