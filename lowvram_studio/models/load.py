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
from diffusers import StableVideoDiffusionPipeline, WanImageToVideoPipeline

from ..engine.families import family_for
from ..engine.fingerprint import weights_fingerprint
from ..engine.family import VideoFamily
from ..engine.preview import attach_latent_rgb
from ..userdirs import cache_dir
from .deferred import FP16_VARIANT, DeferredTextEncoder
from .errors import ModelError
from .demo import DEMO_MODEL_NAME, build_demo_pipeline, demo_model_info
from .latent_rgb import cached_projection_path, load_or_fit_latent_rgb
from .discovery import WEIGHT_COMPONENTS, pickle_only_weights, pickle_refusal
from .safetensors_file import SingleFileError, check_checkpoint_path, narrowest_stored, read_header
from .single_file import load_single_file
from .source_family import wan_fps
from .wan_split_files import SplitTextEncoder, load_split_set
from .wan_split_set import TRANSFORMER, find_set, is_comfy_folder, transformer_in, wan_part

logger = logging.getLogger(__name__)

SVD_PIPELINE_CLASS = "StableVideoDiffusionPipeline"
# Wan2.1 / Wan2.2 image-to-video folders name WanImageToVideoPipeline; Wan2.2 TI2V-5B's names WanPipeline (its
# text-to-video face) and loads as image-to-video with the same components.
WAN_PIPELINE_CLASSES = ("WanImageToVideoPipeline", "WanPipeline")
_WEIGHT_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class FolderLayout:
    """What a diffusers folder of one family must hold: each component's config file, which carry weights."""

    pipeline_class: type
    config_files: dict[str, str]
    weights: tuple[str, ...]


SVD_LAYOUT = FolderLayout(StableVideoDiffusionPipeline, {
    "unet": "config.json",
    "vae": "config.json",
    "image_encoder": "config.json",
    "scheduler": "scheduler_config.json",
    "feature_extractor": "preprocessor_config.json",
}, WEIGHT_COMPONENTS)
WAN_LAYOUT = FolderLayout(WanImageToVideoPipeline, {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}, ("transformer", "vae", "text_encoder"))


_JSON_KINDS = {list: "list", str: "string", bool: "boolean"}


def json_kind(data: object) -> str:
    """How a parsed JSON value that should have been an object reads in a message: 'a JSON list', 'JSON null'."""
    return "JSON null" if data is None else f"a JSON {_JSON_KINDS.get(type(data), 'number')}"


@dataclass
class LoadedModel:
    """A pipeline plus what the UI, CLI and run record say about it."""

    pipeline: StableVideoDiffusionPipeline
    name: str
    source: str
    kind: str  # "demo" | "diffusers-folder" | "hf-cache" | "single-file" | "comfyui-split-files"
    note: str = ""  # shown to the user (e.g. that the demo weights are random)
    # a Wan model's text encoder left on disk (its folder's text_encoder/ or ComfyUI's file), read when a prompt needs it
    text_encoder_source: DeferredTextEncoder | SplitTextEncoder | None = None

    @property
    def family(self) -> VideoFamily:
        return family_for(self.pipeline, self.name, text_encoder_source=self.text_encoder_source)

    def describe(self) -> dict:
        """The run record's ``model`` entry."""
        pipe, family = self.pipeline, self.family
        components = [c.attribute for c in family.components]
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "family": family.kind,
            "native_frames": native_size(pipe)[2],
            "dtypes": {c: self._dtype_of(c) for c in components},
            "parameters": {c: self._parameters_of(c) for c in components},
            "note": self.note,
        }

    def _dtype_of(self, attribute: str) -> str:
        module = getattr(self.pipeline, attribute)
        if module is None:
            return "on disk until a prompt is not in the prompt cache"
        return str(module.dtype).removeprefix("torch.")

    def _parameters_of(self, attribute: str) -> int:
        module = getattr(self.pipeline, attribute)
        if module is None and attribute == "text_encoder" and self.text_encoder_source is not None:
            return self.text_encoder_source.parameters()
        return sum(p.numel() for p in module.parameters())


def native_size(pipeline: StableVideoDiffusionPipeline) -> tuple[int, int, int]:
    """(height, width, frames) the model was made for: SVD's 576x1024, or the demo's small square; Wan2.2
    TI2V's 704x1280x121 (its 48-channel VAE), Wan2.1's 480x832x81."""
    if family_for(pipeline).kind == "wan":
        return (704, 1280, 121) if pipeline.vae.config.z_dim == 48 else (480, 832, 81)
    frames = pipeline.unet.config.num_frames
    side = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    if side >= 512:
        return 576, 1024, frames
    return side, side, frames


def native_settings(pipeline: StableVideoDiffusionPipeline) -> dict[str, int | str]:
    """The size, frames and (Wan: 24 fps for TI2V, 16 for Wan2.1) frame rate a model was made for, and
    (Wan) its text encoder's precision."""
    height, width, frames = native_size(pipeline)
    native = {"height": height, "width": width, "num_frames": frames}
    if family_for(pipeline).kind == "wan":
        native["fps"] = wan_fps(pipeline.vae.config.z_dim)
        native["encoder_dtype"] = "auto"  # UMT5 in bf16 where the device has it, as Wan ships and runs it
    return native


def load_model(
    source: str | Path, dtype: torch.dtype = torch.float32, on_progress: Callable[[int, int], None] | None = None
) -> LoadedModel:
    """``demo``, a diffusers folder, a ``.safetensors`` single file (SVD, or the transformer of ComfyUI's Wan split
    files), a ComfyUI folder holding one Wan model, or an HF id already in the cache.

    ``on_progress(bytes_done, bytes_total)`` follows the reading of a single file (multi-GB files).
    """
    text = str(source).strip()
    if text in ("", DEMO_MODEL_NAME):
        return LoadedModel(build_demo_pipeline(), DEMO_MODEL_NAME, DEMO_MODEL_NAME, "demo", demo_model_info().note)
    path = Path(text).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file() and is_comfy_folder(path):
        return _load_file(_checked(transformer_in, path), dtype, on_progress)
    if path.is_dir():
        return _load_folder(path, dtype, path.name, "diffusers-folder")
    if path.is_file():
        return _load_file(path, dtype, on_progress)
    if _looks_like_hub_id(text):
        folder = _cached_snapshot(text)
        return _load_folder(folder, dtype, text, "hf-cache")
    raise ModelError(
        f"model {text!r} was not found: it is not 'demo', an existing folder or file, or a Hugging Face id; "
        "give the path of a diffusers SVD folder (with model_index.json) or an svd_xt.safetensors file "
        "(`lowvram-studio models` lists the ones found on this machine)"
    )


def check_model_folder(folder: Path) -> FolderLayout:
    """Raise ``ModelError`` naming the folder and everything missing from a diffusers SVD or Wan layout;
    return the layout the folder follows."""
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
    if class_name == SVD_PIPELINE_CLASS:
        layout = SVD_LAYOUT
    elif class_name in WAN_PIPELINE_CLASSES:
        layout = WAN_LAYOUT
    else:
        raise ModelError(
            f"{folder} holds a {class_name or 'unknown'} model, not Stable Video Diffusion or Wan image-to-video; "
            "choose an SVD / SVD-XT or a Wan2.1 I2V / Wan2.2 TI2V model"
        )
    if layout is WAN_LAYOUT and index.get("transformer_2", [None])[0] is not None:
        raise ModelError(f"{folder} is a two-expert Wan2.2 model (transformer_2, e.g. I2V-A14B), which LowVRAM "
                         "Studio does not run yet; use Wan2.2 TI2V-5B or a Wan2.1 I2V model")
    pickled = pickle_only_weights(folder, layout.weights)
    if pickled:
        raise ModelError(pickle_refusal(folder, pickled))
    missing = []
    for component, config_file in layout.config_files.items():
        sub = folder / component
        if not (sub / config_file).is_file():
            missing.append(f"{component}/{config_file}")
        elif component in layout.weights and not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in sub.iterdir()):
            missing.append(f"{component}/ weights (*.safetensors)")
    if "tokenizer/tokenizer_config.json" in missing:
        raise ModelError(f"{folder} has no tokenizer: Wan's prompt needs the UMT5 tokenizer in {folder / 'tokenizer'} "
                         "(tokenizer_config.json with its spiece.model or tokenizer.json, as in the Wan-AI "
                         "...-Diffusers repositories); copy that folder there")
    if missing:
        raise ModelError(f"{folder} is incomplete: missing {', '.join(missing)}; re-download the model folder")
    return layout


def _load_folder(folder: Path, dtype: torch.dtype, name: str, kind: str) -> LoadedModel:
    """A diffusers folder's pipeline; a Wan folder's text encoder stays on disk until a prompt needs it
    (``models/deferred.py``)."""
    layout = check_model_folder(folder)
    denoiser = folder / layout.weights[0]
    weights = list(denoiser.glob("*.safetensors"))  # variant files match diffusion_pytorch_model*.safetensors too
    only_fp16 = bool(weights) and all(FP16_VARIANT.search(path.name) for path in weights)
    deferred = None
    if layout is WAN_LAYOUT:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        deferred = DeferredTextEncoder(folder / "text_encoder", index["text_encoder"][1])
    dtypes = {"default": dtype, **{c: load_dtype(folder / c, dtype, only_fp16) for c in layout.weights}}
    logger.info("loading diffusers %s folder %s (%s)", layout.pipeline_class.__name__, folder, dtypes)
    try:
        pipeline = layout.pipeline_class.from_pretrained(
            folder, dtype=dtypes, local_files_only=True, use_safetensors=True, variant="fp16" if only_fp16 else None,
            **({"text_encoder": None} if deferred else {}),
        )
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ModelError(f"{folder} could not be loaded ({exc}); the files may be damaged, re-download them") from exc
    pipeline.set_progress_bar_config(disable=True)
    for component in layout.weights:
        if getattr(pipeline, component) is not None:
            getattr(pipeline, component).eval().requires_grad_(False)
    if layout is SVD_LAYOUT:
        pipeline = _with_preview(pipeline)
    return LoadedModel(pipeline, name, str(folder), kind, text_encoder_source=deferred)


def load_dtype(component: Path, wanted: torch.dtype, fp16_variant: bool) -> torch.dtype:
    """``wanted``, or the narrower floating dtype the component's files hold: a bf16 checkpoint read into
    fp32 doubles its RAM (Wan's 5 B transformer: 10 -> 20 GB) for bits it never had, and the engine casts
    every component to its run's dtype anyway (widening is exact)."""
    files = sorted(component.glob("*.safetensors"))
    chosen = [f for f in files if bool(FP16_VARIANT.search(f.name)) == fp16_variant] or files
    try:
        return narrowest_stored([read_header(path) for path in chosen], wanted)
    except SingleFileError:
        return wanted  # from_pretrained says what is wrong with the file


def _with_preview(pipeline: StableVideoDiffusionPipeline) -> StableVideoDiffusionPipeline:
    """Attach the live-preview projection, fitted on first use of these VAE weights and cached in the
    user's data folder by their fingerprint. A VAE it cannot be fitted on only costs the preview."""
    path = cached_projection_path(cache_dir(), weights_fingerprint(pipeline.vae))
    try:
        attach_latent_rgb(pipeline, load_or_fit_latent_rgb(pipeline.vae, path, save=True))
    except (RuntimeError, ValueError) as exc:
        logger.warning("no live preview for this model: its VAE could not be fitted (%s)", exc)
    return pipeline


def _checked(function: Callable, *args, **kwargs):
    """``function(*args, **kwargs)`` with a file's SingleFileError raised as the loaders' ModelError."""
    try:
        return function(*args, **kwargs)
    except SingleFileError as exc:
        raise ModelError(str(exc)) from exc


def _load_file(path: Path, dtype: torch.dtype, on_progress: Callable[[int, int], None] | None) -> LoadedModel:
    """An SVD single file, or a Wan transformer with the VAE and text encoder ComfyUI keeps beside it."""
    header = _checked(read_header, _checked(check_checkpoint_path, path))
    part = wan_part(header)
    if part == TRANSFORMER:
        files = _checked(find_set, header)
        logger.info("loading ComfyUI's Wan split files %s", ", ".join(str(f) for f in files.files))
        pipeline, text_encoder = _checked(load_split_set, files, dtype, on_progress)
        return LoadedModel(pipeline, path.stem, str(path), "comfyui-split-files", text_encoder_source=text_encoder)
    if part is not None:
        raise ModelError(f"{path} is Wan's {part}, one of ComfyUI's three Wan files; give the diffusion model, "
                         "e.g. --model models/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors (its VAE and text "
                         "encoder are found in ComfyUI's models/vae/ and models/text_encoders/)")
    pipeline = _checked(load_single_file, path, dtype, on_progress=on_progress)
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
