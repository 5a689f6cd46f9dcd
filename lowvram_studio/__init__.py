"""LowVRAM Studio: Stable Video Diffusion image-to-video on small GPUs, every memory trick measured."""

__version__ = "0.1.0"
