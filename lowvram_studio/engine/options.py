"""The engine's option vocabulary: the values a technique's knob can take.

Standard library only, so that the settings table (lowvram_studio/settings.py), the CLI and the studio
can name these values without importing torch, and the engine's techniques own the words they act on.
"""

from __future__ import annotations

from enum import Enum


class Precision(str, Enum):
    """Storage precision of a component. ``auto`` lets the precision policy pick for the GPU."""

    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"


class HalfCompute(str, Enum):
    """What a component stored in fp16 computes in. ``auto``: by GPU generation (precision.py)."""

    AUTO = "auto"
    FP16 = "fp16"
    FP32 = "fp32"  # fp16 storage, each layer up-cast to fp32 just before it runs


class OffloadMode(str, Enum):
    """Where weights live while they are not computing (placement.py)."""

    NONE = "none"  # everything stays on the GPU
    MODEL = "model"  # whole components move to the GPU when used (accelerate hooks)
    STREAM = "stream"  # UNet blocks stream in with prefetch on a CUDA stream (group offloading)


class WindowBlend(str, Enum):
    """How overlapping temporal windows are weighted where they meet (windows.py)."""

    FLAT = "flat"
    LINEAR = "linear"
    PYRAMID = "pyramid"


class PruneMode(str, Enum):
    """Which reuse the pruning threshold drives (pruning.py)."""

    STEPS = "steps"  # reuse deep-block residuals across sampler steps
    FRAMES = "frames"  # reuse a near-duplicate neighbour's spatial-layer output
    BOTH = "both"


class DeviceChoice(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
