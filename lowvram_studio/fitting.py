"""``fit``: a plain diffusers ``StableVideoDiffusionPipeline`` runs its own ``pipe(...)`` within a VRAM budget.

    with lowvram_studio.fit(pipe, budget="6GB", height=576, width=1024, num_frames=25) as plan:
        frames = pipe(image, height=576, width=1024, num_frames=25).frames[0]

Inside the block the pipeline carries the plan's techniques, all lossless except the decode's tiles and
frame chunks: the UNet in 16 bit on a GPU, the guidance branches one after the other (a hook that
splits the UNet's batch), chunked layers, streamed weights, and our chunked / tiled VAE decode in place
of the pipeline's ``decode_latents`` (its ``decode_chunk_size`` argument is then ignored: the plan's
decode runs). Moves that need the engine's own loop (temporal windows, step reuse, interpolation) and
lossy casts (fp8) are not planned here; ``generate`` has them.

Leaving the block restores the pipeline exactly: every parameter and buffer gets its original tensor
back (same values, dtype, device), every hook and attribute added inside is gone. diffusers has no undo
for casts, group offloading leftovers or hook registries as a whole, so ``_Snapshot`` keeps each
module's own state (written by hand for that gap); it holds the original weights by reference, on the
CPU: a pipeline that was on the GPU gives its GPU copy up for the block and gets it back after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput

from .engine.chunking import split_cfg_call
from .engine.components import SVD_COMPONENTS
from .engine.placement import make_room
from .engine.precision import compute_dtype, detect_gpu
from .engine.sampler import prepare
from .engine.svd import SvdFamily
from .engine.vae import decode_latents
from .plan.budgets import budget_for
from .plan.planner import Plan, Planner
from .settings import RunSettings, SettingsError
from .settings_adapter import decode_config, engine_config

# What a bare ``pipe(...)`` can honour: moves inside the UNet's and the VAE's calls. Model offload is left
# out because only the engine's loop sends the idle components back (``make_room``) between phases.
FIT_MOVES = ("cfg_split", "ff_chunk", "spatial_chunk", "temporal_chunk", "offload_stream", "vae_tile", "decode_frames")
FIT_HOOK = "lowvram_fit_unet"
UNET_ARGUMENTS = ("encoder_hidden_states", "added_time_ids", "return_dict")  # after sample, timestep
_MODULE_STATE = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_hooks_with_kwargs",
                 "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


@dataclass(frozen=True)
class FitPlan:
    """What ``fit`` put on the pipeline: the settings, each move's reason and the predicted peak."""

    settings: RunSettings
    plan: Plan | None
    device: torch.device

    @property
    def reasons(self) -> list[str]:
        return [] if self.plan is None else self.plan.summary()

    @property
    def predicted_peak_gib(self) -> float | None:
        return None if self.plan is None else self.plan.prediction.peak_mib / 1024


class _FitUNetHook(ModelHook):
    """Around each UNet call of the pipeline's loop: the idle components leave the GPU, the inputs take the
    UNet's compute dtype (the pipeline makes them in its encoder's fp32), the two guidance branches run
    one after the other when asked, and the prediction returns in fp32 as the engine's does."""

    def __init__(self, pipeline: Any, split: bool):
        super().__init__()
        self.pipeline = pipeline
        self.split = split

    def new_forward(self, module: torch.nn.Module, sample: torch.Tensor, timestep: Any, *args: Any,
                    **kwargs: Any) -> Any:
        make_room(self.pipeline, "unet")
        kwargs.update(zip(UNET_ARGUMENTS, args))
        return_dict = kwargs.pop("return_dict", True)
        dtype = compute_dtype(module)
        inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}

        def call(part: torch.Tensor, **batched: Any) -> torch.Tensor:
            return self.fn_ref.original_forward(part, timestep, **batched, return_dict=False)[0]

        sample = sample.to(dtype)
        split = self.split and sample.shape[0] > 1
        out = (split_cfg_call(call, sample, **inputs) if split else call(sample, **inputs)).float()
        return UNetSpatioTemporalConditionOutput(sample=out) if return_dict else (out,)


class _Snapshot:
    """Each component module's own state (attributes, parameter and buffer tensors, torch hook tables)
    and the pipeline's attributes, to put back exactly."""

    def __init__(self, pipeline: Any, attributes: tuple[str, ...]):
        self.pipeline = pipeline
        self.pipeline_state = dict(pipeline.__dict__)
        self.modules: list[tuple[torch.nn.Module, dict[str, Any], dict[str, dict]]] = []
        self.tensors: list[tuple[torch.Tensor, torch.Tensor, torch.device]] = []
        for attribute in attributes:
            component = getattr(pipeline, attribute, None)
            if component is None:
                continue
            for module in component.modules():
                tables = {name: dict(module.__dict__[name]) for name in _MODULE_STATE if name in module.__dict__}
                self.modules.append((module, dict(module.__dict__), tables))
                for tensor in (*module._parameters.values(), *module._buffers.values()):
                    if tensor is not None:
                        original = tensor.data if tensor.device.type == "cpu" else tensor.data.to("cpu")
                        self.tensors.append((tensor, original, tensor.device))

    def restore(self) -> None:
        for module, state, tables in self.modules:
            module.__dict__.clear()
            module.__dict__.update(state)
            for name, table in tables.items():
                live = module.__dict__[name]
                live.clear()
                live.update(table)
        for tensor, original, device in self.tensors:
            tensor.data = original.to(device)
        self.pipeline.__dict__.clear()
        self.pipeline.__dict__.update(self.pipeline_state)


def _decode_with_plan(pipeline: Any, settings: RunSettings) -> Any:
    """The pipeline's ``decode_latents(latents, num_frames, decode_chunk_size)`` as the plan decodes."""
    config = decode_config(settings)

    def decode(latents: torch.Tensor, num_frames: int, decode_chunk_size: int = 14) -> torch.Tensor:
        make_room(pipeline, "vae")
        clips = [decode_latents(pipeline.vae, clip, config) for clip in latents]  # each (F, 3, H, W)
        return torch.stack(clips).permute(0, 2, 1, 3, 4).float()

    return decode


def _settings_for(pipeline: Any, budget: str | None, height: int, width: int, num_frames: int | None,
                  device: torch.device, settings: RunSettings | None) -> tuple[RunSettings, Plan | None]:
    frames = num_frames or int(pipeline.unet.config.num_frames)
    base = (settings or RunSettings()).replace(height=height, width=width, num_frames=frames,
                                               device="cuda" if device.type == "cuda" else "cpu")
    base.validate()
    if budget is None:
        return base, None
    family = SvdFamily(pipeline)
    planner = Planner.for_gpu(family.dims(), detect_gpu(device), dict(pipeline.unet.config))
    found = budget_for(base.replace(vram_budget=budget).validate().vram_budget, planner.model)
    if found is None:
        return base, None
    plan = planner.plan(base, found, allowed=FIT_MOVES)
    if not plan.fits:
        raise SettingsError([f"{width}x{height}x{frames} does not fit {budget} on a bare pipe(): "
                             + "; ".join(plan.summary()) + "; or use lowvram_studio's generate(), which can also "
                             "use temporal windows, model offload and fp8"])
    if plan.settings.window_frames:
        raise SettingsError([f"{frames} frames are more than the model was trained on ({pipeline.unet.config.num_frames}); "
                             "a bare pipe() cannot run temporal windows: ask for fewer frames or use generate()"])
    return plan.settings, plan


@contextlib.contextmanager
def fit(
    pipe: Any,
    budget: str | None = "6GB",
    *,
    height: int = 576,
    width: int = 1024,
    num_frames: int | None = None,
    device: str | torch.device = "cuda",
    settings: RunSettings | None = None,
) -> Iterator[FitPlan]:
    """Plan ``pipe`` into ``budget`` (e.g. "6GB", "auto"; None: exactly ``settings``' techniques) for clips of
    ``height`` x ``width`` x ``num_frames`` (default: the model's native length) on ``device``, put the plan
    on the pipeline for the block and restore the pipeline exactly after it, also on errors.

    Raises ``SettingsError`` (what is wrong; what to do) when no bare-pipeline plan fits."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(["fit(device='cuda') needs a CUDA GPU and PyTorch sees none; pass device='cpu'"])
    chosen, plan = _settings_for(pipe, budget, height, width, num_frames, device, settings)
    attributes = tuple(component.attribute for component in SVD_COMPONENTS)
    snapshot = _Snapshot(pipe, attributes)
    try:
        # Our hook goes in first, under the placement's hooks: group offloading with CUDA streams removes its
        # lazy-prefetch hook after the UNet's first call, and diffusers' ``HookRegistry.remove_hook`` then
        # rewires the next hook's ``forward`` to the removed one's inner forward, which skips a ``new_forward``
        # hook registered above it (ours: every later step ran with fp32 inputs into fp16 weights).
        HookRegistry.check_if_exists_or_initialize(pipe.unet).register_hook(
            _FitUNetHook(pipe, chosen.cfg_split), FIT_HOOK)
        prepare(SvdFamily(pipe), engine_config(chosen), device)
        pipe.decode_latents = _decode_with_plan(pipe, chosen)
        yield FitPlan(chosen, plan, device)
    finally:
        snapshot.restore()
        if device.type == "cuda":
            torch.cuda.empty_cache()
