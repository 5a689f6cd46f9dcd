"""Which files make one Wan2.2 TI2V-5B model in ComfyUI's split layout, told apart by their headers alone.

ComfyUI keeps a Wan model as three files under ``models/``: the transformer in ``diffusion_models/`` (older
installs: ``unet/``), the VAE in ``vae/`` and the UMT5-XXL text encoder in ``text_encoders/`` (older: ``clip/``),
e.g. ``wan2.2_ti2v_5B_fp16.safetensors``, ``wan2.2_vae.safetensors`` and ``umt5_xxl_fp16.safetensors`` or
``umt5_xxl_fp8_e4m3fn_scaled.safetensors``. The transformer file names the set (it is what ``--model`` takes);
the VAE and the text encoder are looked up in their ComfyUI folders (and beside the transformer), by content:
a Wan2.2 VAE whose latent width fits the transformer, a UMT5 encoder whose width fits its text projection.
ComfyUI's conventional names are preferred when several files fit. Nothing is read beyond the headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

from .safetensors_file import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, SafetensorsHeader, SingleFileError, read_header

TRANSFORMER, VAE, TEXT_ENCODER = "transformer", "VAE", "text encoder"
# ComfyUI's folders under models/, first the current name
FOLDERS = {TRANSFORMER: ("diffusion_models", "unet"), VAE: ("vae",), TEXT_ENCODER: ("text_encoders", "clip")}
PREFERRED_NAMES = {
    TRANSFORMER: ("wan2.2_ti2v_5B_fp16.safetensors",),
    VAE: ("wan2.2_vae.safetensors",),
    TEXT_ENCODER: ("umt5_xxl_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
}
LABELS = {VAE: "Wan2.2 VAE", TEXT_ENCODER: "UMT5-XXL text encoder"}
TI2V_LATENT_CHANNELS = 48  # Wan2.2's VAE; Wan2.1's has 16
# UMT5 (unlike T5) has a relative attention bias in every block, not only the first
UMT5_MARKER = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
WAN_VAE_MARKER = CHECKPOINT_KEY_NAMES["wan_vae"]


def wan_part(header: SafetensorsHeader) -> str | None:
    """TRANSFORMER, VAE or TEXT_ENCODER for a Wan file (diffusers' own marker keys for the first two), else None."""
    keys = header.entries
    if any(key in keys for key in CHECKPOINT_KEY_NAMES["wan"]):
        return TRANSFORMER
    if WAN_VAE_MARKER in keys:
        return VAE
    if "shared.weight" in keys and "encoder.final_layer_norm.weight" in keys and UMT5_MARKER in keys:
        return TEXT_ENCODER
    return None


def transformer_prefix(header: SafetensorsHeader) -> str:
    """ComfyUI saves some diffusion models with the checkpoint prefix ``model.diffusion_model.``."""
    return "model.diffusion_model." if "model.diffusion_model.head.modulation" in header.entries else ""


@dataclass(frozen=True)
class WanSplitSet:
    """The three files of one ComfyUI Wan model."""

    transformer: Path
    vae: Path
    text_encoder: Path

    @property
    def files(self) -> tuple[Path, Path, Path]:
        return self.transformer, self.vae, self.text_encoder

    @property
    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)


def models_folder(transformer: Path) -> Path | None:
    """ComfyUI's ``models/`` above a file in ``diffusion_models/`` (or a subfolder of it), else None."""
    for parent in transformer.parents:
        if parent.name in FOLDERS[TRANSFORMER]:
            return parent.parent
    return None


def _files_in(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files in ``folder`` and its subfolders (ComfyUI users sort models into them), one level deep."""
    if not folder.is_dir():
        return []
    found = [*folder.glob("*"), *folder.glob("*/*")]
    return sorted(p for p in found if p.suffix.lower() in suffixes and p.is_file())


def _preferred_first(paths: list[Path], part: str) -> list[Path]:
    names = PREFERRED_NAMES[part]
    return sorted(paths, key=lambda p: names.index(p.name) if p.name in names else len(names))


def _fit(header: SafetensorsHeader, part: str, transformer: SafetensorsHeader) -> str | None:
    """Why a file of the right kind does not fit this transformer (None: it fits)."""
    prefix = transformer_prefix(transformer)
    if part == VAE:
        channels = header.entries["conv2.weight"].shape[0] if "conv2.weight" in header.entries else None
        wanted = transformer.entries[f"{prefix}patch_embedding.weight"].shape[1]
        if channels != wanted:
            return (f"a VAE with {channels} latent channels (Wan2.1's has 16), where this transformer takes "
                    f"{wanted} (Wan2.2's VAE)")
    if part == TEXT_ENCODER:
        width = header.entries["shared.weight"].shape[1]
        wanted = transformer.entries[f"{prefix}text_embedding.0.weight"].shape[1]
        if width != wanted:
            return f"a text encoder {width} wide, where this transformer takes {wanted}"
    return None


def _find_part(part: str, transformer: SafetensorsHeader, root: Path | None) -> Path:
    """The file playing ``part`` for ``transformer``: in ComfyUI's folders for it under ``root``, then beside the
    transformer; SingleFileError says what to put where."""
    places = [root / name for name in FOLDERS[part]] if root else []
    places.append(transformer.path.parent)
    rejected, pickled = [], []
    for place in places:
        pickled += [p.name for p in _files_in(place, PICKLE_SUFFIXES)]
        for path in _preferred_first(_files_in(place, SAFETENSORS_SUFFIXES), part):
            if path == transformer.path:
                continue
            try:
                header = read_header(path)
            except SingleFileError as exc:
                if path.name in PREFERRED_NAMES[part]:
                    raise
                rejected.append(f"{path.name} (unreadable: {exc})")
                continue
            if wan_part(header) != part:
                continue
            why = _fit(header, part, transformer)
            if why is None:
                return path
            rejected.append(f"{path.name} ({why})")
    folder = FOLDERS[part][0]
    target = root / folder if root else transformer.path.parent
    found = f"; not usable: {', '.join(rejected)}" if rejected else ""
    refused = (f"; pickle files are refused (loading them runs whatever code they contain): {', '.join(pickled)}"
               if pickled else "")
    searched = " or ".join(str(p) for p in places if p.is_dir())
    raise SingleFileError(
        f"{transformer.path} is a Wan transformer, but no {LABELS[part]} for it was found in "
        f"{searched}{found}{refused}; put ComfyUI's "
        f"{' or '.join(PREFERRED_NAMES[part])} into {target} (ComfyUI keeps it in models/{folder}/)"
    )


def find_set(transformer: SafetensorsHeader) -> WanSplitSet:
    """The VAE and text encoder for a Wan transformer file: in ComfyUI's folders beside its ``diffusion_models/``,
    then in the transformer's own folder."""
    in_channels = transformer.entries[f"{transformer_prefix(transformer)}patch_embedding.weight"].shape[1]
    if in_channels != TI2V_LATENT_CHANNELS:
        raise SingleFileError(
            f"{transformer.path} is a Wan transformer with {in_channels} input channels, not Wan2.2 TI2V-5B "
            f"({TI2V_LATENT_CHANNELS}): Wan2.1 and the two-expert Wan2.2 A14B load from diffusers folders only; use "
            "wan2.2_ti2v_5B_fp16.safetensors or a Wan diffusers folder")
    root = models_folder(transformer.path)
    return WanSplitSet(transformer.path, _find_part(VAE, transformer, root), _find_part(TEXT_ENCODER, transformer, root))


def _models_of(folder: Path) -> Path:
    """ComfyUI's ``models/`` for its root or for itself."""
    return folder / "models" if (folder / "models").is_dir() else folder


def transformer_in(folder: Path) -> Path:
    """The one Wan transformer in a ComfyUI folder or its ``models/`` folder; SingleFileError when there is
    none or several (naming them)."""
    models = _models_of(folder)
    places = [models / name for name in FOLDERS[TRANSFORMER] if (models / name).is_dir()]
    found = []
    for place in places:
        for path in _preferred_first(_files_in(place, SAFETENSORS_SUFFIXES), TRANSFORMER):
            try:
                if wan_part(read_header(path)) == TRANSFORMER:
                    found.append(path)
            except SingleFileError:
                continue
    if len(found) == 1:
        return found[0]
    if found:
        raise SingleFileError(f"{folder} holds several Wan diffusion models ({', '.join(p.name for p in found)}); "
                              "name one: --model <its .safetensors file>")
    raise SingleFileError(
        f"{folder} is neither a diffusers model folder (no model_index.json) nor a ComfyUI folder with a Wan "
        f"diffusion model in {models / FOLDERS[TRANSFORMER][0]}; give a diffusers SVD / Wan folder, an "
        "svd_xt.safetensors, or put wan2.2_ti2v_5B_fp16.safetensors into ComfyUI's models/diffusion_models/")


def is_comfy_folder(folder: Path) -> bool:
    """A ComfyUI root or its ``models/`` folder (it has a diffusion models folder)."""
    return any((_models_of(folder) / name).is_dir() for name in FOLDERS[TRANSFORMER])


def names_wan_split_set(path: Path) -> bool:
    """Whether ``path`` names a ComfyUI Wan model: its transformer file, or a ComfyUI folder with one (headers
    only; what else the set needs is checked when it loads)."""
    try:
        if path.is_file():
            return wan_part(read_header(path)) == TRANSFORMER
        if path.is_dir() and is_comfy_folder(path):
            transformer_in(path)
            return True
    except SingleFileError:
        return False
    return False
