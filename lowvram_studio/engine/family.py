"""The model-family interface: what a family of image-to-video models gives the engine.

The engine's loop (``sampler.sample``), its temporal windows, step reuse, placement, precision and the
planner's dims talk to this interface, never to a model's class names. A family wraps one loaded
diffusers pipeline and says: which modules play which role (``components``), how a request becomes
conditioning (``encode``), one guided denoiser call on a slice of frames (``predict``), how latents
become pixels (``decode``), and the sizes the planner needs (``dims``).

Latents cross the interface frame-major, (1, F, C, h, w), whatever the family's own layout: windows,
reuse and the live preview cut along frames at axis 1. SVD is the first family (``engine/svd.py``);
a DiT video family (diffusers' Wan / LTX: a transformer denoiser, a text encoder, a 3D causal VAE)
permutes its (1, C, F, h, w) latents at its own boundary and keeps its text embeddings in its
conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .components import Component, by_role
from .dims import ModelDims
from .events import CancelToken
from .precision import PrecisionPolicy
from .pruning_config import PruningConfig
from .pruning_record import PruningSummary
from .vae import DecodeConfig


@dataclass(frozen=True)
class ClipRequest:
    """What every family makes: the clip's size and length, the sampler's steps, the seed."""

    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    seed: int = 0


class Conditioning(Protocol):
    """Everything the denoiser sees besides the noisy latents, for both guidance branches."""

    def frames(self, frames: slice) -> "Conditioning":
        """The conditioning of a temporal window of the clip."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the run record says about how it was made (Wan: where its prompt embeddings came from)."""
        ...


class ReuseState(Protocol):
    """One run's step/frame reuse on the denoiser (SVD: engine/pruning.py; DiTs: engine/step_cache.py)."""

    def begin_step(self, index: int, total: int) -> None: ...

    def end_step(self, x0: torch.Tensor | None) -> dict[str, Any]:
        """What the step reused, for its progress event."""
        ...

    def summary(self) -> PruningSummary: ...

    def remove(self) -> None:
        """Take the hooks off (also after an error)."""
        ...


class VideoFamily(Protocol):
    kind: str  # the family: "svd", "wan"
    name: str  # the model's name, shown in records
    pipeline: Any  # the diffusers pipeline the family wraps; techniques attach to its modules
    components: tuple[Component, ...]

    @property
    def scheduler(self) -> Any:
        """A diffusers scheduler (``set_timesteps``, ``step``, ``init_noise_sigma``)."""
        ...

    def load_for(self, request: Any, device: torch.device, policy: PrecisionPolicy) -> None:
        """Before precision and placement: read what ``request`` needs that the loader left on disk (Wan: the
        text encoder, when the prompt cache lacks a text); SVD holds everything and does nothing."""
        ...

    def encode(self, request: Any, device: torch.device, generator: torch.Generator) -> Conditioning:
        """The request's conditioning (image, prompt, ...) on ``device``; runs the encoder(s) once."""
        ...

    def initial_noise(self, request: Any, generator: torch.Generator) -> torch.Tensor:
        """The seeded starting noise, frame-major (1, F, C, h, w), float32 on the CPU, drawn as the family's
        own diffusers pipeline draws it (same layout, same order), so a seed gives the pipeline's clip."""
        ...

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (pixels per denoiser token or per UNet downsampling)."""
        ...

    def apply_reuse(self, config: PruningConfig) -> ReuseState | None:
        """Hook step (and frame) reuse into the denoiser for one run; None when ``config`` turns it off.
        ValueError for a reuse mode the denoiser cannot do."""
        ...

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, frames: slice,
                cfg_split: bool) -> torch.Tensor:
        """The guided noise prediction (float32) for ``latents`` = frames ``frames`` of the clip.

        ``cfg_split``: the guidance branches one after the other (lossless, half the activations)."""
        ...

    def final_latents(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoised latents as the decoder takes them (a family that pins conditioned frames puts them
        back here; SVD: unchanged)."""
        ...

    def decode(self, latents: torch.Tensor, config: DecodeConfig, cancel: CancelToken) -> torch.Tensor:
        """Latents (1, F, C, h, w) -> float32 video (1, 3, F, H, W) in [-1, 1], chunked / tiled as
        ``config`` says; ``cancel`` is checked between chunks."""
        ...

    def to_frames(self, video: torch.Tensor) -> np.ndarray:
        """Video (1, 3, F, H, W) in [-1, 1] -> float32 frames (F, H, W, 3) in [0, 1]."""
        ...

    def dims(self) -> ModelDims:
        """The sizes the planner's memory model and the speed model need."""
        ...


def module_of(family: VideoFamily, role: str) -> torch.nn.Module:
    """The pipeline's module playing ``role`` (components.DENOISER, VAE, ENCODER)."""
    return getattr(family.pipeline, by_role(family.components, role).attribute)
