"""Precision policy: a storage and a compute dtype per component, chosen for the GPU; a NaN/inf guard.

Each GPU generation gets an execution path (``execution_path``), shown in the studio and the run
record, and ``half_compute`` overrides its compute dtype: Pascal and Volta (sm < 7.5) store fp16 and
compute fp32 (Pascal's fp16 arithmetic runs at 1/64 rate; no bf16; no torch.compile, whose Triton
backend this project only enables from Turing); GTX 16xx (TU116/TU117) store fp16 and compute fp32
(fp16 arithmetic gives NaN/black frames there) with the NaN guard; Turing RTX and newer compute
fp16; Ampere and newer may use bf16; Ada and Hopper have native fp8, which older cards only get by
up-casting each layer (slower, same memory). The NaN guard checks every step on every path. The VAE decodes in fp32 by
default (an fp16 VAE shifts colours, as the write-up found) and the image is encoded in fp32.
Storage that differs from compute (fp8 storage, or fp16 storage with fp32 compute) goes through
diffusers' layerwise casting, which casts each layer's weights just before it runs.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import apply_layerwise_casting
from diffusers.models.modeling_utils import ModelMixin

from .components import DENOISER, ENCODER, SVD_COMPONENTS, VAE, Component, by_role
from .options import HalfCompute, Precision

logger = logging.getLogger(__name__)

DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8",
}
# Turing chips without fp16-safe arithmetic for diffusion (GTX 16xx and their workstation siblings).
_FP16_UNSAFE_NAMES = re.compile(r"GTX 16\d\d|TU11[67]|T[0-9]{3,4}\b|Quadro T", re.IGNORECASE)


class PrecisionError(ValueError):
    """A requested precision the hardware cannot run; the message says what to choose instead."""


class NonFiniteError(RuntimeError):
    """A component produced NaN or inf; the message names the component and the setting to change."""

    def __init__(self, message: str, component: str, setting: str):
        super().__init__(message)
        self.component = component
        self.setting = setting


@dataclass(frozen=True)
class GpuInfo:
    """What the policy needs to know about a GPU (a plain value, so tables of named GPUs are testable)."""

    name: str
    capability: tuple[int, int]

    @property
    def supports_bf16(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def fp16_compute_safe(self) -> bool:
        """False where fp16 arithmetic is known to give NaN/black output or is missing (GTX 16xx, pre-Pascal)."""
        return self.capability >= (6, 0) and not _FP16_UNSAFE_NAMES.search(self.name)


GENERATIONS = (  # (first capability, name), newest last
    ((5, 0), "Maxwell"), ((6, 0), "Pascal"), ((7, 0), "Volta"), ((7, 5), "Turing"), ((8, 0), "Ampere"),
    ((8, 9), "Ada"), ((9, 0), "Hopper"), ((10, 0), "Blackwell"),
)


@dataclass(frozen=True)
class ExecutionPath:
    """How a GPU generation runs half-precision models: the facts the policy and the record state."""

    gpu: str
    generation: str
    half_compute: torch.dtype
    bf16: bool
    native_fp8: bool
    compile: bool
    overridden: bool = False

    def describe(self) -> str:
        """One line for the studio and the run record."""
        compute = "fp16 compute" if self.half_compute == torch.float16 else "fp16 storage + fp32 compute"
        parts = [compute + (" (set by half_compute)" if self.overridden else ""), "NaN guard on",
                 "bf16 allowed" if self.bf16 else "no bf16",
                 "native fp8 storage" if self.native_fp8 else "fp8 storage by up-casting",
                 "torch.compile allowed" if self.compile else "no torch.compile"]
        return f"{self.gpu} ({self.generation}): " + ", ".join(parts)


def execution_path(gpu: "GpuInfo | None", half_compute: HalfCompute = HalfCompute.AUTO) -> ExecutionPath:
    """The path for ``gpu`` (None: the CPU, which computes in whatever dtype the weights are stored in)."""
    half_compute = HalfCompute(half_compute)
    if gpu is None:
        generation, auto, bf16, fp8, compile_ok = "CPU", torch.float16, True, False, False
    else:
        generation = next(name for first, name in reversed(GENERATIONS) if gpu.capability >= first) \
            if gpu.capability >= GENERATIONS[0][0] else "pre-Maxwell"
        if generation == "Turing" and not gpu.fp16_compute_safe:
            generation = "Turing GTX 16xx"
        auto = torch.float16 if gpu.capability >= (7, 5) and gpu.fp16_compute_safe else torch.float32
        bf16, fp8, compile_ok = gpu.supports_bf16, gpu.capability >= (8, 9), gpu.capability >= (7, 5)
    chosen = {HalfCompute.AUTO: auto, HalfCompute.FP16: torch.float16, HalfCompute.FP32: torch.float32}[half_compute]
    if gpu is not None and chosen == torch.float16 and not gpu.fp16_compute_safe:
        logger.warning("half_compute=fp16 on %s: fp16 arithmetic is known to give NaN/black frames there", gpu.name)
    return ExecutionPath(gpu.name if gpu else "CPU", generation, chosen, bf16, fp8, compile_ok,
                         overridden=chosen != auto)


def detect_gpu(device: torch.device | str) -> GpuInfo | None:
    """The GPU behind ``device``; None on the CPU. Called per run, never at import."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return GpuInfo(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


@dataclass(frozen=True)
class ComponentPrecision:
    """How one component keeps its weights (storage) and runs its arithmetic (compute)."""

    storage: torch.dtype
    compute: torch.dtype

    @property
    def casts_layerwise(self) -> bool:
        return self.storage != self.compute

    def describe(self) -> str:
        storage, compute = DTYPE_NAMES[self.storage], DTYPE_NAMES[self.compute]
        return storage if storage == compute else f"{storage} storage, {compute} compute"


def resolve_component(requested: Precision, component: Component, gpu: GpuInfo | None,
                      path: ExecutionPath | None = None) -> ComponentPrecision:
    """Storage and compute dtype for one component; raises ``PrecisionError`` for impossible requests.

    ``auto`` stores the denoiser in fp16 on a GPU and keeps everything else (and every CPU run) in fp32,
    except a component marked ``auto_bf16``, kept in bf16 on the CPU and on GPUs with bf16 (Ampere on)."""
    requested = Precision(requested)
    path = path or execution_path(gpu)
    setting = component.setting
    if requested == Precision.AUTO:
        if component.auto_bf16 and (gpu is None or gpu.supports_bf16):
            return ComponentPrecision(torch.bfloat16, torch.bfloat16)
        if component.role != DENOISER or gpu is None:
            return ComponentPrecision(torch.float32, torch.float32)
        return ComponentPrecision(torch.float16, path.half_compute)
    if requested == Precision.FP32:
        return ComponentPrecision(torch.float32, torch.float32)
    if requested == Precision.FP16:
        return ComponentPrecision(torch.float16, path.half_compute)
    if requested == Precision.BF16:
        if gpu is not None and not gpu.supports_bf16:
            raise PrecisionError(
                f"{setting}=bf16 needs an Ampere (RTX 30xx) or newer GPU; {gpu.name} "
                f"(sm_{gpu.capability[0]}{gpu.capability[1]}) has no bf16; choose fp16 or fp32 for {setting}"
            )
        return ComponentPrecision(torch.bfloat16, torch.bfloat16)
    # fp8 is storage only: each layer is cast up to the compute dtype just before it runs.
    return ComponentPrecision(torch.float8_e4m3fn, path.half_compute if gpu is not None else torch.float32)


@dataclass(frozen=True)
class PrecisionRequest:
    """The precision asked for each role, before the GPU resolves ``auto`` (``PrecisionPolicy.resolve``)."""

    denoiser: Precision = Precision.AUTO
    vae: Precision = Precision.FP32
    encoder: Precision = Precision.FP32
    half_compute: HalfCompute = HalfCompute.AUTO


@dataclass(frozen=True)
class PrecisionPolicy:
    """Storage and compute dtype per role, resolved for one GPU (None: the CPU) on its execution path."""

    denoiser: ComponentPrecision
    vae: ComponentPrecision
    encoder: ComponentPrecision
    gpu: GpuInfo | None = None
    path: ExecutionPath | None = None
    components: tuple[Component, ...] = SVD_COMPONENTS

    @classmethod
    def resolve(cls, request: PrecisionRequest, gpu: GpuInfo | None,
                components: tuple[Component, ...] = SVD_COMPONENTS) -> "PrecisionPolicy":
        path = execution_path(gpu, request.half_compute)
        return cls(
            **{role: resolve_component(getattr(request, role), by_role(components, role), gpu, path)
               for role in (DENOISER, VAE, ENCODER)},
            gpu=gpu,
            path=path,
            components=components,
        )

    def component(self, name: str) -> ComponentPrecision:
        """The precision of a role, or of the component at pipeline attribute ``name`` (``"unet"``)."""
        return getattr(self, by_role(self.components, name).role)

    def describe(self) -> dict[str, str]:
        """Per pipeline attribute, e.g. {"unet": "fp16", "vae": "fp32", ...}, for the run record."""
        return {c.attribute: self.component(c.role).describe() for c in self.components}


def precision_applied(pipeline: Any, policy: PrecisionPolicy) -> bool:
    """True when every component already runs as ``policy`` says."""
    return all(
        getattr(getattr(pipeline, c.attribute), "_lowvram_precision", None) == policy.component(c.role)
        for c in policy.components
        if getattr(pipeline, c.attribute, None) is not None
    )


def _mantissa_bits(dtype: torch.dtype) -> int:
    """Explicit mantissa bits (fp32 23, fp16 10, bf16 7, fp8 e4m3 3): what a cast to ``dtype`` keeps."""
    return round(-math.log2(torch.finfo(dtype).eps))


def rounded_components(pipeline: Any, policy: PrecisionPolicy) -> list[str]:
    """Components whose weights an earlier run rounded below the precision ``policy`` stores them in.

    Casting back up cannot bring the lost bits back, so such a component must be reloaded from disk
    (the studio does that before the run) — otherwise an "FP32" run would quietly use fp16 weights.
    """
    stale = []
    for component in policy.components:
        module = getattr(pipeline, component.attribute, None)
        rounded = getattr(module, "_lowvram_rounded_bits", None)
        if rounded is not None and rounded < _mantissa_bits(policy.component(component.role).storage):
            stale.append(component.attribute)
    return stale


def forget_precision(module: torch.nn.Module) -> None:
    """Mark a component as holding its original weights again (after its exact weights were restored)."""
    for attribute in ("_lowvram_precision", "_lowvram_rounded_bits"):
        module.__dict__.pop(attribute, None)


def apply_precision(pipeline: Any, policy: PrecisionPolicy) -> None:
    """Cast each pipeline component to its compute dtype and attach layerwise casting where storage differs.

    Layerwise casting cannot be undone (diffusers refuses: the weights were rounded to the storage
    dtype), so a component stored in a narrower dtype keeps that choice until the model is reloaded.
    """
    for component in policy.components:
        name = component.attribute
        module = getattr(pipeline, name, None)
        if module is None:
            continue
        precision = policy.component(component.role)
        applied = getattr(module, "_lowvram_precision", None)
        if applied == precision:
            continue
        if (applied is not None and applied.casts_layerwise) or name in rounded_components(pipeline, policy):
            raise PrecisionError(
                f"the {component.label}'s weights were rounded to {applied.describe() if applied else 'a narrower dtype'} "
                f"by an earlier run and cannot become {precision.describe()} again; reload the model to change "
                f"{component.setting}"
            )
        module.to(dtype=precision.compute)
        if precision.compute != torch.float32:
            keep_fp32_modules(module)
        if precision.casts_layerwise:
            if isinstance(module, ModelMixin):
                module.enable_layerwise_casting(storage_dtype=precision.storage, compute_dtype=precision.compute)
            else:
                apply_layerwise_casting(module, storage_dtype=precision.storage, compute_dtype=precision.compute)
        module._lowvram_precision = precision
        bits = min(_mantissa_bits(precision.storage), _mantissa_bits(precision.compute))
        module._lowvram_rounded_bits = min(bits, getattr(module, "_lowvram_rounded_bits", bits))
        logger.info("precision: %s %s", name, precision.describe())


def keep_fp32_modules(module: torch.nn.Module) -> None:
    """Put back in fp32 the parts a model class asks to keep there (``_keep_in_fp32_modules``: Wan's norms,
    time embedder and rope, UMT5's ``wo``), as diffusers' and transformers' ``from_pretrained(torch_dtype=...)``
    do when they load in half precision; a cast after loading must keep the same rule (same name test:
    a pattern equals one part of the parameter's dotted name)."""
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    for name, parameter in [*module.named_parameters(), *module.named_buffers()]:
        if parameter.is_floating_point() and any(part in keep for part in name.split(".")):
            parameter.data = parameter.data.float()


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a component's inputs must have: its compute dtype (not its fp8 storage dtype)."""
    applied = getattr(module, "_lowvram_precision", None)
    if applied is not None:
        return applied.compute
    return next(module.parameters()).dtype


def _alternatives(dtype_name: str, gpu: GpuInfo | None) -> str:
    if dtype_name == "fp16":
        return "bf16 or fp32" if gpu is None or gpu.supports_bf16 else "fp32"
    if dtype_name == "fp8":
        return "fp16 or fp32"
    return "fp32"


def check_finite(
    tensor: torch.Tensor,
    component: str,
    policy: PrecisionPolicy,
    where: str = "",
) -> None:
    """Raise ``NonFiniteError`` if ``tensor`` holds NaN or inf, naming the component and the fix.

    ``where`` says when (e.g. "at step 3"). One reduction per call: cheap next to a UNet step.
    """
    if bool(torch.isfinite(tensor).all()):
        return
    kind = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
    precision = policy.component(component)
    dtype_name = DTYPE_NAMES[precision.storage]
    named = by_role(policy.components, component)
    label, setting = named.label, named.setting
    place = f" {where}" if where else ""
    if precision.storage == torch.float32:
        message = (
            f"the {label} produced {kind}{place} in fp32, so precision is not the cause; "
            "the model weights or the input image are likely broken; reload the model or try another image"
        )
    else:
        message = (
            f"the {label} produced {kind}{place} in {precision.describe()}; "
            f"set {setting} to {_alternatives(dtype_name, policy.gpu)}"
        )
    raise NonFiniteError(message, named.attribute, setting)
