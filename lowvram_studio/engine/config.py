"""EngineConfig: how the engine runs a clip, in the engine's own words, one typed part per technique.

The engine never reads the app's settings: the app maps its ``RunSettings`` to this once
(``lowvram_studio.settings_adapter``), and a library user builds it directly. Each part belongs to its
technique's module, shaped like diffusers' hooks (``XxxConfig`` + ``apply_xxx(module, config)``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .chunking import ChunkingConfig
from .options import DeviceChoice, OffloadMode
from .precision import PrecisionRequest
from .pruning_config import PruningConfig
from .vae import DecodeConfig
from .windows import WindowConfig


@dataclass(frozen=True)
class EngineConfig:
    """Every technique's setting for one run. The defaults run the plain recipe (the diffusers pipeline's
    frames), with the denoiser in fp16 on a GPU and a live preview every step."""

    device: DeviceChoice = DeviceChoice.AUTO
    precision: PrecisionRequest = field(default_factory=PrecisionRequest)
    cfg_split: bool = False  # the two guidance branches one after the other (lossless, half the activations)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    offload: OffloadMode = OffloadMode.NONE
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    windows: WindowConfig = field(default_factory=WindowConfig)
    reuse: PruningConfig = field(default_factory=lambda: PruningConfig(threshold=0.0))
    preview_every: int = 1  # a live preview every N denoise steps; 0 = none

    def replace(self, **changes: object) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
