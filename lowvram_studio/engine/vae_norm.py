"""Image-wide GroupNorm statistics for tiled VAE decode.

A tile decoded on its own normalises every GroupNorm with the tile's own mean and variance, so a dark
tile is brightened, a flat one amplified, and tiles disagree far beyond their seams. ``GroupNormStatistics``
lets one "statistics pass" of the decoder (on the whole chunk's latents, downscaled to one tile's area)
record per call and per sample the mean and variance of each group; every tile pass then normalises with
those image-wide figures: ``(x - mean) / sqrt(var + eps) * weight + bias``.

The same idea as the fast mode of the "Tiled VAE" extension for Stable Diffusion web UIs; written here
by hand because neither torch nor diffusers offers normalisation with given group statistics.

The downscaled pass loses fine detail and so underestimates the variance of the high-resolution layers
(up to 19x on one generated clip), and an underestimate amplifies: that clip decoded at -12.6 dB. A tile
is therefore never divided by less than ``OWN_VARIANCE_FLOOR`` times its own variance. Measured on the
demo model: floor 1.0 (never below the tile's own) costs 2-4 dB where the estimate is good, 0.25 lets
flat clips slip; 0.5 was best or within 1 dB of best on every clip tried.

Calls are keyed by (module, call index within one pass): the temporal decoder calls its GroupNorms on
4-D tensors (frames as samples), on 5-D ones (temporal blocks: one sample, statistics over T, H, W) and on
3-D ones (the mid-block attention); a module called twice per pass gets two records. A tile pass must
use the same samples (frames) as the statistics pass; a mismatch raises.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

OWN_VARIANCE_FLOOR = 0.5  # see the module docstring


def _group_mean_var(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance over the last axis, accumulated and returned in float32 without a
    float32 copy of the activation (fp16 squares overflow; a copy would double the tile's memory)."""
    mean = grouped.mean(dim=-1, dtype=torch.float32)
    mean_square = torch.linalg.vector_norm(grouped, dim=-1, dtype=torch.float32).square() / grouped.shape[-1]
    return mean, (mean_square - mean.square()).clamp_min(0)


class GroupNormStatistics:
    """Records GroupNorm statistics in one decoder pass and applies them in the passes that follow.

    Use through :func:`image_wide_group_norm`, which installs and always removes the wrappers.
    """

    def __init__(self) -> None:
        self._records: dict[torch.nn.GroupNorm, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._calls: dict[torch.nn.GroupNorm, int] = {}
        self._recording = False

    @contextmanager
    def recording(self) -> Iterator[None]:
        """The pass inside records fresh statistics (and normalises with them, as plain GroupNorm does)."""
        self._records.clear()
        self._calls.clear()
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def start_pass(self) -> None:
        """Begin a decoder pass that applies the recorded statistics from each module's first call again."""
        self._calls.clear()

    def forward(self, norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        """Stands in for ``norm.forward``: same result shape and dtype, recorded instead of own statistics."""
        call = self._calls.get(norm, 0)
        self._calls[norm] = call + 1
        grouped = x.reshape(x.shape[0], norm.num_groups, -1)
        if self._recording:
            mean, var = _group_mean_var(grouped)
            self._records.setdefault(norm, []).append((mean, var))
        else:
            mean, var = self._recorded(norm, call, x.shape[0])
            # The downscaled pass underestimates variance; never amplify far beyond the tile's own spread.
            var = torch.maximum(var, OWN_VARIANCE_FLOOR * _group_mean_var(grouped)[1])
        out = grouped - mean[..., None].to(x.dtype)
        out.mul_(torch.rsqrt(var + norm.eps)[..., None].to(x.dtype))
        out = out.reshape(x.shape)
        if norm.affine:
            channel_shape = (1, -1) + (1,) * (x.dim() - 2)
            out.mul_(norm.weight.to(x).view(channel_shape)).add_(norm.bias.to(x).view(channel_shape))
        return out

    def _recorded(self, norm: torch.nn.GroupNorm, call: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        records = self._records.get(norm, [])
        if call >= len(records):
            raise RuntimeError(
                f"GroupNorm call {call + 1} of this decode pass has no recorded statistics ({len(records)} recorded); "
                "the statistics pass must run the same decoder path as the tiles"
            )
        mean, var = records[call]
        if mean.shape[0] != samples:
            raise RuntimeError(
                f"GroupNorm statistics were recorded for {mean.shape[0]} samples but this pass has {samples}; "
                "the statistics pass must decode the same frames as the tiles"
            )
        return mean, var


@contextmanager
def image_wide_group_norm(module: torch.nn.Module) -> Iterator[GroupNormStatistics]:
    """Route every ``torch.nn.GroupNorm`` inside ``module`` through one :class:`GroupNormStatistics` for the
    duration of the block; the modules' own ``forward`` is restored on exit, also on errors.

    The wrapper is an instance attribute ``forward`` (a torch forward hook cannot replace the computation,
    only redo it); an instance ``forward`` some other library set is put back as it was.
    """
    statistics = GroupNormStatistics()
    norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
    previous = {norm: norm.__dict__.get("forward") for norm in norms}
    try:
        for norm in norms:
            norm.forward = functools.partial(statistics.forward, norm)
        yield statistics
    finally:
        for norm in norms:
            if previous[norm] is None:
                norm.__dict__.pop("forward", None)
            else:
                norm.forward = previous[norm]
