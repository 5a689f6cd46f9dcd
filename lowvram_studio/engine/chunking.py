"""Lossless chunking of the SVD UNet: the same arithmetic in smaller pieces, so activations stay small.

In ``UNetSpatioTemporalConditionModel`` every tensor is laid out ``(batch * frames, ...)`` and the layers
fall in two kinds (DESIGN §4):

* spatial layers (``ResnetBlock2D`` inside ``SpatioTemporalResBlock``, ``BasicTransformerBlock`` inside
  ``TransformerSpatioTemporalModel``, the down/up-samplers) act on each frame alone, so running them a
  few frames at a time gives the same numbers;
* temporal transformer layers (``TemporalBasicTransformerBlock``) act on each spatial position alone
  (attention runs across frames), so running them a few positions at a time gives the same numbers.
  ``TemporalResnetBlock`` is left whole: its GroupNorm pools statistics over frames *and* positions.

Feed-forward layers act on each token alone and are split into row chunks. diffusers'
``unet.enable_forward_chunking`` does the same for SVD (spatial FF over frames, temporal ``ff_in``/``ff``
over frames) but insists that the chunk size divides the dimension (``_chunked_feed_forward`` raises
otherwise); our row chunks accept any size.

Every piece is a diffusers ``ModelHook`` on an existing diffusers module (no fork), written by hand
because diffusers has no such hook. Outputs are written into one preallocated tensor so that the full
result never coexists with a list of chunk results. Classifier-free-guidance split (two batch-1 UNet
calls instead of one batch-2 call) lives in the sampler's denoise loop; see ``split_cfg_call``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention import FeedForward, TemporalBasicTransformerBlock
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import SpatioTemporalResBlock
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel
from diffusers.models.upsampling import Upsample2D

logger = logging.getLogger(__name__)

SPATIAL_HOOK = "lowvram_spatial_chunk"
TEMPORAL_HOOK = "lowvram_temporal_chunk"
FEED_FORWARD_HOOK = "lowvram_ff_chunk"
HOOK_NAMES = (SPATIAL_HOOK, TEMPORAL_HOOK, FEED_FORWARD_HOOK)
SPATIAL_MIN_BYTES = 32 * 2**20  # SVD at 576x1024x25 fp16: chunks the two top resolutions, not the deepest two


@dataclass(frozen=True)
class ChunkingConfig:
    """Chunk sizes for the UNet's layers; 0 leaves that kind of layer whole.

    spatial_chunk: frames (rows of the batch*frames axis) per call of a spatial layer.
    temporal_chunk: spatial positions per call of a temporal transformer block.
    ff_chunk: tokens per call of a feed-forward layer.
    spatial_min_bytes: spatial layers whose input is smaller run whole. The deep, low-resolution
        layers never set the peak, and cutting their small tensors only adds kernel launches
        (on the H100, frame chunks everywhere cost ~1.3x time at case B).
    """

    spatial_chunk: int = 0
    temporal_chunk: int = 0
    ff_chunk: int = 0
    spatial_min_bytes: int = 0


def _ranges(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _fill(out: torch.Tensor | None, piece: torch.Tensor, full_shape: tuple[int, ...], index: Any) -> torch.Tensor:
    """Write ``piece`` into the preallocated output (allocated like the first piece)."""
    if out is None:
        out = piece.new_empty(full_shape)
    out[index] = piece
    return out


class _FrameChunkHook(ModelHook):
    """Spatial layer: run ``size`` rows of the (batch*frames) axis at a time.

    Every tensor argument whose first dimension equals the hidden states' (``temb``, the repeated
    ``encoder_hidden_states``) is cut the same way; everything else passes through.
    """

    def __init__(self, size: int, min_bytes: int = 0):
        super().__init__()
        self.size = size
        self.min_bytes = min_bytes

    def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = hidden_states.shape[0]
        small = hidden_states.numel() * hidden_states.element_size() < self.min_bytes
        if rows <= self.size or small:
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)

        def cut(value: Any, start: int, stop: int) -> Any:
            same_rows = isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows
            return value[start:stop] if same_rows else value

        out = None
        for start, stop in _ranges(rows, self.size):
            piece = self.fn_ref.original_forward(
                hidden_states[start:stop],
                *(cut(a, start, stop) for a in args),
                **{k: cut(v, start, stop) for k, v in kwargs.items()},
            )
            out = _fill(out, piece, (rows, *piece.shape[1:]), slice(start, stop))
        return out


class _TokenChunkHook(ModelHook):
    """Temporal transformer block: run ``size`` spatial positions at a time.

    Input is ``(batch*frames, positions, channels)``; its cross-attention context is laid out
    ``(batch*positions, tokens, dim)``, so it is cut per batch at the same positions.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def new_forward(
        self,
        module: torch.nn.Module,
        hidden_states: torch.Tensor,
        num_frames: int,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        positions = hidden_states.shape[1]
        if positions <= self.size:
            return self.fn_ref.original_forward(hidden_states, num_frames, encoder_hidden_states=encoder_hidden_states)
        batch = hidden_states.shape[0] // num_frames
        context = None
        if encoder_hidden_states is not None:
            context = encoder_hidden_states.view(batch, positions, *encoder_hidden_states.shape[1:])
        out = None
        for start, stop in _ranges(positions, self.size):
            piece_context = None if context is None else context[:, start:stop].reshape(-1, *context.shape[2:])
            piece = self.fn_ref.original_forward(
                hidden_states[:, start:stop], num_frames, encoder_hidden_states=piece_context
            )
            out = _fill(out, piece, (piece.shape[0], positions, *piece.shape[2:]), (slice(None), slice(start, stop)))
        return out


class _RowChunkHook(ModelHook):
    """Feed-forward layer: run ``size`` tokens (rows of the flattened input) at a time."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = hidden_states.shape[:-1].numel()
        if rows <= self.size:
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        flat = hidden_states.reshape(rows, hidden_states.shape[-1])
        out = None
        for start, stop in _ranges(rows, self.size):
            piece = self.fn_ref.original_forward(flat[start:stop], *args, **kwargs)
            out = _fill(out, piece, (rows, piece.shape[-1]), slice(start, stop))
        return out.view(*hidden_states.shape[:-1], out.shape[-1])


def spatial_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The per-frame layers of an SVD UNet that frame chunking wraps."""
    found: list[torch.nn.Module] = []
    for module in unet.modules():
        if isinstance(module, SpatioTemporalResBlock):
            found.append(module.spatial_res_block)
        elif isinstance(module, TransformerSpatioTemporalModel):
            found.extend(module.transformer_blocks)
        elif isinstance(module, (Downsample2D, Upsample2D)):
            found.append(module)
    return found


def temporal_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The per-position temporal transformer blocks that token chunking wraps."""
    return [m for m in unet.modules() if isinstance(m, TemporalBasicTransformerBlock)]


def feed_forward_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in unet.modules() if isinstance(m, FeedForward)]


def chunking_applied(unet: torch.nn.Module) -> ChunkingConfig:
    """The chunking the UNet runs with now (all zero when none)."""
    return getattr(unet, "_lowvram_chunking", ChunkingConfig())


def apply_chunking(unet: torch.nn.Module, config: ChunkingConfig) -> None:
    """Attach the chunk hooks ``config`` asks for (replacing earlier ones); output is unchanged.

    Apply before weight placement: a placement hook must wrap the chunk hooks of a module it shares,
    or every chunk would load that module's weights again.
    """
    if chunking_applied(unet) == config:
        return
    remove_chunking(unet)
    plan = (
        ("spatial_chunk", spatial_layers, lambda: _FrameChunkHook(config.spatial_chunk, config.spatial_min_bytes), SPATIAL_HOOK),
        ("temporal_chunk", temporal_layers, lambda: _TokenChunkHook(config.temporal_chunk), TEMPORAL_HOOK),
        ("ff_chunk", feed_forward_layers, lambda: _RowChunkHook(config.ff_chunk), FEED_FORWARD_HOOK),
    )
    for field, find, make_hook, name in plan:
        size = getattr(config, field)
        if size <= 0:
            continue
        layers = find(unet)
        if not layers:  # e.g. SVD's frame/position chunks on a Wan transformer: refused, never silently nothing
            raise ValueError(f"{field} has no layers to cut in {type(unet).__name__}; set it to 0 "
                             "(ff_chunk cuts the feed-forward layers of SVD and Wan alike)")
        for layer in layers:
            HookRegistry.check_if_exists_or_initialize(layer).register_hook(make_hook(), name)
        logger.debug("chunking: %s=%d on %d layers", name, size, len(layers))
    HookRegistry.check_if_exists_or_initialize(unet).invalidate_child_registries_cache()
    unet._lowvram_chunking = config


def remove_chunking(unet: torch.nn.Module) -> None:
    """Detach every chunk hook; the UNet runs whole again."""
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    for name in HOOK_NAMES:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
    unet._lowvram_chunking = ChunkingConfig()


def chunk_hook_counts(unet: torch.nn.Module) -> dict[str, int]:
    """How many layers carry each chunk hook (for the run record and tests)."""
    counts = dict.fromkeys(HOOK_NAMES, 0)
    for module in unet.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in HOOK_NAMES:
            if registry.get_hook(name) is not None:
                counts[name] += 1
    return counts


def split_cfg_call(model: Callable[..., torch.Tensor], sample: torch.Tensor, **batched: Any) -> torch.Tensor:
    """Run a batched UNet call one batch element (CFG branch) at a time; same result, half the activations.

    ``sample`` and every tensor in ``batched`` whose first dimension is the batch size are cut per
    element; other values pass through. Returns the concatenated outputs like the batched call would.
    """
    batch = sample.shape[0]
    out = None
    for index in range(batch):
        kwargs = {
            name: value[index : index + 1] if isinstance(value, torch.Tensor) and value.shape[:1] == (batch,) else value
            for name, value in batched.items()
        }
        piece = model(sample[index : index + 1], **kwargs)
        out = _fill(out, piece, (batch, *piece.shape[1:]), slice(index, index + 1))
    return out
