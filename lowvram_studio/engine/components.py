"""The components a model family hands the engine, by role: what the techniques attach to.

A technique speaks of roles (the denoiser is cast to fp16 and streamed, the VAE decodes in fp32, the
encoder runs once), and each family says which pipeline attribute plays each role, how the user calls
it and which setting sets its precision (for messages). SVD: UNet, temporal VAE, CLIP image encoder;
a DiT family: transformer, 3D VAE, text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

DENOISER, VAE, ENCODER = "denoiser", "vae", "encoder"


@dataclass(frozen=True)
class Component:
    attribute: str  # the pipeline attribute holding the module: "unet", "transformer", "image_encoder"
    role: str  # DENOISER, VAE or ENCODER
    label: str  # what the user calls it: "UNet"
    setting: str  # the setting that picks its precision, named in messages: "unet_dtype"


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
