"""Where a pipeline comes from: the demo model, a diffusers SVD folder, or an HF cache id — offline.

Nothing is ever downloaded: a model is read from disk or the user is told exactly what is missing.
Weights are read from safetensors only: pickle (``.bin``) weights run code when loaded, so a folder with
only those is refused, and diffusers / transformers are told ``use_safetensors=True`` so they never fall
back to a ``.bin`` beside them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableVideoDiffusionPipeline

from ..engine.preview import attach_latent_rgb
from ..userdirs import cache_dir
from .demo import DEMO_MODEL_NAME, build_demo_pipeline, demo_model_info
from .latent_rgb import cached_projection_path, load_or_fit_latent_rgb, vae_fingerprint
from .discovery import WEIGHT_COMPONENTS, pickle_only_weights, pickle_refusal
from .single_file import SingleFileError, load_single_file

logger = logging.getLogger(__name__)

SVD_PIPELINE_CLASS = "StableVideoDiffusionPipeline"
SVD_COMPONENTS = ("unet", "vae", "image_encoder", "scheduler", "feature_extractor")
_WEIGHT_SUFFIXES = (".safetensors",)
_CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "image_encoder": "config.json",
    "scheduler": "scheduler_config.json",
    "feature_extractor": "preprocessor_config.json",
}


_JSON_KINDS = {list: "list", str: "string", bool: "boolean"}


def json_kind(data: object) -> str:
    """How a parsed JSON value that should have been an object reads in a message: 'a JSON list', 'JSON null'."""
    return "JSON null" if data is None else f"a JSON {_JSON_KINDS.get(type(data), 'number')}"


class ModelError(ValueError):
    """A model that cannot be used, phrased as 'what is wrong; what to do'."""


@dataclass
class LoadedModel:
    """A pipeline plus what the UI, CLI and run record say about it."""

    pipeline: StableVideoDiffusionPipeline
    name: str
    source: str
    kind: str  # "demo" | "diffusers-folder" | "hf-cache" | "single-file"
    note: str = ""  # shown to the user (e.g. that the demo weights are random)

    def describe(self) -> dict:
        """The run record's ``model`` entry."""
        pipe = self.pipeline
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "native_frames": pipe.unet.config.num_frames,
            "dtypes": {c: str(getattr(pipe, c).dtype).removeprefix("torch.") for c in ("unet", "vae", "image_encoder")},
            "parameters": {
                c: sum(p.numel() for p in getattr(pipe, c).parameters()) for c in ("unet", "vae", "image_encoder")
            },
            "note": self.note,
        }


def native_size(pipeline: StableVideoDiffusionPipeline) -> tuple[int, int, int]:
    """(height, width, frames) the model was made for: SVD's 576x1024, or the demo's small square."""
    frames = pipeline.unet.config.num_frames
    side = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    if side >= 512:
        return 576, 1024, frames
    return side, side, frames


def load_model(
    source: str | Path, dtype: torch.dtype = torch.float32, on_progress: Callable[[int, int], None] | None = None
) -> LoadedModel:
    """``demo``, a diffusers folder, a ``.safetensors`` single file, or an HF id already in the cache.

    ``on_progress(bytes_done, bytes_total)`` follows the reading of a single file (multi-GB files).
    """
    text = str(source).strip()
    if text in ("", DEMO_MODEL_NAME):
        return LoadedModel(build_demo_pipeline(), DEMO_MODEL_NAME, DEMO_MODEL_NAME, "demo", demo_model_info().note)
    path = Path(text).expanduser()
    if path.is_dir():
        return LoadedModel(_load_folder(path, dtype), path.name, str(path), "diffusers-folder")
    if path.is_file():
        return _load_file(path, dtype, on_progress)
    if _looks_like_hub_id(text):
        folder = _cached_snapshot(text)
        return LoadedModel(_load_folder(folder, dtype), text, str(folder), "hf-cache")
    raise ModelError(
        f"model {text!r} was not found: it is not 'demo', an existing folder or file, or a Hugging Face id; "
        "give the path of a diffusers SVD folder (with model_index.json) or an svd_xt.safetensors file "
        "(`lowvram-studio models` lists the ones found on this machine)"
    )


def check_svd_folder(folder: Path) -> None:
    """Raise ``ModelError`` naming the folder and everything missing from a diffusers SVD layout."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelError(
            f"{folder} has no model_index.json, so it is not a diffusers model folder; "
            "point to the folder that holds model_index.json (e.g. stable-video-diffusion-img2vid-xt)"
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{index_file} cannot be read ({exc}); re-download or repair the model folder") from exc
    if not isinstance(index, dict):
        raise ModelError(f"{index_file} holds {json_kind(index)}, not the object of components a diffusers model index is; "
                         "re-download or repair the model folder")
    class_name = index.get("_class_name")
    if class_name != SVD_PIPELINE_CLASS:
        raise ModelError(
            f"{folder} holds a {class_name or 'unknown'} model, not Stable Video Diffusion; "
            "choose an SVD / SVD-XT image-to-video model"
        )
    pickled = pickle_only_weights(folder)
    if pickled:
        raise ModelError(pickle_refusal(folder, pickled))
    missing = []
    for component in SVD_COMPONENTS:
        sub = folder / component
        if not (sub / _CONFIG_FILES[component]).is_file():
            missing.append(f"{component}/{_CONFIG_FILES[component]}")
        elif component in WEIGHT_COMPONENTS and not any(
            f.name.endswith(_WEIGHT_SUFFIXES) for f in sub.iterdir()
        ):
            missing.append(f"{component}/ weights (*.safetensors)")
    if missing:
        raise ModelError(f"{folder} is incomplete: missing {', '.join(missing)}; re-download the model folder")


def _load_folder(folder: Path, dtype: torch.dtype) -> StableVideoDiffusionPipeline:
    check_svd_folder(folder)
    only_fp16 = not any((folder / "unet").glob("diffusion_pytorch_model.safetensors")) and any(
        (folder / "unet").glob("*.fp16.safetensors")
    )
    logger.info("loading diffusers SVD folder %s", folder)
    try:
        pipeline = StableVideoDiffusionPipeline.from_pretrained(
            folder, dtype=dtype, local_files_only=True, use_safetensors=True, variant="fp16" if only_fp16 else None
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{folder} could not be loaded ({exc}); the files may be damaged, re-download them") from exc
    pipeline.set_progress_bar_config(disable=True)
    for component in ("unet", "vae", "image_encoder"):
        getattr(pipeline, component).eval().requires_grad_(False)
    return _with_preview(pipeline)


def _with_preview(pipeline: StableVideoDiffusionPipeline) -> StableVideoDiffusionPipeline:
    """Attach the live-preview projection, fitted on first use of these VAE weights and cached in the
    user's data folder by their fingerprint. A VAE it cannot be fitted on only costs the preview."""
    path = cached_projection_path(cache_dir(), vae_fingerprint(pipeline.vae))
    try:
        attach_latent_rgb(pipeline, load_or_fit_latent_rgb(pipeline.vae, path, save=True))
    except (RuntimeError, ValueError) as exc:
        logger.warning("no live preview for this model: its VAE could not be fitted (%s)", exc)
    return pipeline


def _load_file(path: Path, dtype: torch.dtype, on_progress: Callable[[int, int], None] | None) -> LoadedModel:
    try:
        pipeline = load_single_file(path, dtype=dtype, on_progress=on_progress)
    except SingleFileError as exc:
        raise ModelError(str(exc)) from exc
    return LoadedModel(_with_preview(pipeline), path.stem, str(path), "single-file")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _cached_snapshot(repo_id: str) -> Path:
    """The local snapshot of ``repo_id`` in the Hugging Face cache; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as exc:
        raise ModelError(
            f"{repo_id} is not in the Hugging Face cache and LowVRAM Studio never downloads; "
            f"download it once elsewhere (huggingface-cli download {repo_id}) or give a local folder"
        ) from exc
