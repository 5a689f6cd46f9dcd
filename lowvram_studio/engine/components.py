"""The components a model family hands the engine, by role: what the techniques attach to.

A technique speaks of roles (the denoiser is cast to fp16 and streamed, the VAE decodes in fp32, the
encoder runs once), and each family says which pipeline attribute plays each role, how the user calls
it and which setting sets its precision (for messages). SVD: UNet, temporal VAE, CLIP image encoder;
a DiT family: transformer, 3D VAE, text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

DENOISER, VAE, ENCODER = "denoiser", "vae", "encoder"
# How a (U)T5 text encoder's checkpoint names its input embedding (tied: one tensor, either name)
INPUT_EMBEDDING_NAMES = ("shared.weight", "embed_tokens.weight")


@dataclass(frozen=True)
class Component:
    attribute: str  # the pipeline attribute holding the module: "unet", "transformer", "image_encoder"
    role: str  # DENOISER, VAE or ENCODER
    label: str  # what the user calls it: "UNet"
    setting: str  # the setting that picks its precision, named in messages: "unet_dtype"
    # ``auto`` precision picks bf16 where the device has it: for a component trained and shipped in bf16
    # (Wan's UMT5 text encoder), whose fp32 copy would double its RAM (22.7 GB) for nothing
    auto_bf16: bool = False
    # An offload mode moves its ``encoder`` and ``decoder`` halves separately, each when it runs: Wan2.2's VAE
    # decoder is 555 M of its 705 M parameters, needless on the GPU while the first frame is encoded
    moves_in_halves: bool = False


SVD_COMPONENTS = (
    Component("unet", DENOISER, "UNet", "unet_dtype"),
    Component("vae", VAE, "VAE", "vae_dtype"),
    Component("image_encoder", ENCODER, "image encoder", "encoder_dtype"),
)


def by_role(components: tuple[Component, ...], role: str) -> Component:
    """The component playing ``role``; a role may also be named by its attribute (``"unet"``)."""
    for component in components:
        if role in (component.role, component.attribute):
            return component
    raise KeyError(f"no component plays {role!r} in {[c.attribute for c in components]}")


class ComponentSource(Protocol):
    """A component the loader left on disk until a run needs it (``models/deferred.py``): while the prompt
    cache serves every text, Wan's 11 GB text encoder costs no RAM and no load time."""

    def fingerprint(self) -> str:
        """Identifies the weights (class included) without reading all of them."""
        ...

    def parameters(self) -> int:
        """How many parameters the component has (for the planner's dims and the record)."""
        ...

    def largest_streamed_parameter(self) -> int:
        """Elements of its largest weight but the input embedding (``INPUT_EMBEDDING_NAMES``, looked up on the CPU
        while streaming): what leaf-level streaming holds on the GPU at once (the planner)."""
        ...

    def load(self, dtype: torch.dtype) -> torch.nn.Module:
        """Read the component in ``dtype`` (the run's compute dtype for it: never a wider copy than it runs in),
        ready for the engine's precision and placement."""
        ...
