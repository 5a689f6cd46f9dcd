"""LowVRAM Studio: Stable Video Diffusion image-to-video on small GPUs, every memory trick measured."""

import os
import sys

__version__ = "0.2.0"

# Before torch starts CUDA: expandable segments stop the caching allocator fragmenting in the VAE decode
# (#21: the lossless case-B peak fell 6.43 -> 5.70 GiB at the same speed; bench/results/budgets_*.json
# runs with it). PyTorch supports it on Linux only; a value the user set wins.
if sys.platform.startswith("linux"):
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def __getattr__(name: str):
    """``lowvram_studio.fit`` without importing torch on ``import lowvram_studio`` (the launcher imports the
    package before it knows torch is installed)."""
    if name == "fit":
        from .fitting import fit

        return fit
    raise AttributeError(f"module 'lowvram_studio' has no attribute {name!r}")
