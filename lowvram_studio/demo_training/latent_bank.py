"""A ring of pre-encoded clips on the training device, so a UNet step never runs the VAE.

Encoding 14 frames through the frozen VAE costs several times a UNet step on a clip; the bank keeps
each clip's latents (posterior mean and std), first frame and image latent, every step replaces a few
of the oldest entries with fresh clips and samples its batch from all of them. A clip is so seen a
handful of times, each time with fresh latent sample, noise level, noise and fps.
"""

from __future__ import annotations

import torch


class LatentBank:
    """Fixed-capacity ring of ``encode_for_unet`` entries (dicts of tensors with a leading clip axis)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tensors: dict[str, torch.Tensor] = {}
        self.size = 0
        self.next = 0

    def add(self, entries: dict[str, torch.Tensor]) -> None:
        """Store clips, overwriting the oldest ones once the bank is full."""
        count = next(iter(entries.values())).shape[0]
        if not self.tensors:
            self.tensors = {k: v.new_empty((self.capacity, *v.shape[1:])) for k, v in entries.items()}
        slots = (self.next + torch.arange(count)) % self.capacity
        for key, value in entries.items():
            self.tensors[key][slots.to(value.device)] = value
        self.next = int(slots[-1] + 1) % self.capacity
        self.size = min(self.capacity, self.size + count)

    def sample(self, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``count`` clips drawn uniformly (with replacement) from those stored."""
        if self.size == 0:
            raise RuntimeError("the latent bank is empty; add clips before sampling")
        device = next(iter(self.tensors.values())).device
        index = torch.randint(self.size, (count,), generator=generator, device=generator.device).to(device)
        return {key: value[index] for key, value in self.tensors.items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
