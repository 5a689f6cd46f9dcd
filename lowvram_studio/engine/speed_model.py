"""Speed model: seconds per denoise step on the user's GPU, before the run, and calibrated after it.

A step is ``calls`` UNet calls (two CFG branches batched, or one after the other with CFG split; once
per temporal window). Each call runs the UNet's streaming groups in order (engine/placement.py: every
resnet, transformer and resampler of the blocks, plus the modules outside them), and each group costs

    compute  = conv FLOPs / conv rate + other matmul FLOPs / matmul rate      (at the class's efficiency)
             + elements that norms, activations and adds read and write x bytes / memory bandwidth
    transfer = the group's weight bytes / PCIe bandwidth                      (only when streaming)
    group    = max(compute, transfer)    (the next group's weights come in on a CUDA stream meanwhile)

plus a fixed launch cost per call. So on a card whose groups compute far longer than their weights take
to cross PCIe, streaming costs nearly nothing (``streaming_overhead``), while on an H100 the deep,
weight-heavy, low-resolution groups are transfer-bound. Model offload moves each component once per
run (``per_run_transfer_s``), not per step.

FLOPs and moved elements are counted once per (model config, size) by running the UNet on the meta
device (no memory, no arithmetic; ~1 s): ``torch.utils.flop_counter.FlopCounterMode`` for the matmuls,
convolutions and attention (FlopCounterMode counts 2 FLOPs per multiply-add), and a dispatch mode for
everything else. Attention counts its q, k, v and output only: the GPU kernels (flash / memory
efficient) never write the score matrix that the meta device's math path would.

Rates: fp16 compute runs at the class's fp16 rate (tensor cores with fp32 accumulation, which is what
PyTorch asks cuBLAS/cuDNN for; no tensor cores: the plain fp16 rate, and on Pascal fp32's, DESIGN §4);
fp32 compute runs convolutions at the TF32 tensor rate where one exists (``torch.backends.cudnn.
allow_tf32`` is on by default) and matmuls at the fp32 rate (``torch.backends.cuda.matmul.allow_tf32``
is off by default). Peaks, bandwidths and efficiency factors are data: ``gpu_classes.json`` (sources
there). An unknown GPU gets the table's conservative class, and the estimate says so.

Calibration (``SpeedCalibration``): after a run, the measured s/step is kept per model, GPU, size and
the settings that change s/step; the same request then gets the measured figure, and other requests on
the same card get the model's prediction times that card's median measured/predicted ratio.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .events import Phase
from .precision import GpuInfo

logger = logging.getLogger(__name__)

GPU_CLASSES_PATH = Path(__file__).with_name("gpu_classes.json")
CALIBRATION_FILE = "speed_calibration.json"
_CONV_OPS = {torch.ops.aten.convolution, torch.ops.aten._convolution}
# Settings that change the seconds of a denoise step; the calibration is kept per these (with size and model).


# ---- what one UNet call costs (counted on the meta device) ---------------------------------------
@dataclass(frozen=True)
class GroupCost:
    """One streaming group of one UNet call at batch 1: FLOPs, memory-bound elements and parameters."""

    name: str
    conv_flops: float
    matmul_flops: float
    moved_elements: float
    params: int


@dataclass(frozen=True)
class UNetCost:
    """A UNet call at batch 1 for one size, group by group (the order the weights stream in)."""

    groups: tuple[GroupCost, ...]
    layers: int  # convolutions and linears: what layerwise casting hooks, one cast each per call

    @property
    def flops(self) -> float:
        return sum(g.conv_flops + g.matmul_flops for g in self.groups)

    @property
    def params(self) -> int:
        return sum(g.params for g in self.groups)


def streaming_groups(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The groups engine/placement.py streams: each member of the blocks' resnets / attentions / samplers."""
    groups = []
    blocks = [*((f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)), ("mid_block", unet.mid_block),
              *((f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks))]
    for block_name, block in blocks:
        for child_name, child in block.named_children():
            members = list(child) if isinstance(child, torch.nn.ModuleList) else [child]
            groups.extend((f"{block_name}.{child_name}.{i}", m) for i, m in enumerate(members))
    return groups


class _MovedElements(TorchDispatchMode):
    """Elements read and written by the ops that FlopCounterMode does not count (norms, activations, adds,
    casts): the memory-bound part of a call. Views move nothing; inside attention nothing is counted
    (``_AttentionAsKernel`` counts its inputs and output instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0.0
        self.in_attention = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        if not self.in_attention and not aliases and func.overloadpacket not in flop_registry:
            tensors = tree_flatten((args, kwargs, out))[0]
            self.elements += sum(t.numel() for t in tensors if isinstance(t, torch.Tensor))
        return out


class _AttentionAsKernel(TorchFunctionMode):
    """Count scaled_dot_product_attention as the fused GPU kernel moves memory: q, k, v in, output out."""

    def __init__(self, moved: _MovedElements) -> None:
        super().__init__()
        self.moved = moved

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.moved.in_attention = True
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            self.moved.in_attention = False
        self.moved.elements += sum(t.numel() for t in (*args[:3], out))
        return out


@functools.lru_cache(maxsize=32)
def _count(config_json: str, height: int, width: int, frames: int) -> UNetCost:
    from diffusers import UNetSpatioTemporalConditionModel  # heavy import, needed only here

    config = json.loads(config_json)
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel.from_config(config)
    unet.to("meta")  # AlphaBlender makes its mix factor on the CPU (legacy torch.Tensor constructor)
    moved = _MovedElements()
    spent: dict[str, tuple[float, float, float]] = {}
    counter = FlopCounterMode(display=False)

    def snapshot() -> tuple[float, float, float]:
        ops = counter.get_flop_counts().get("Global", {})
        conv = float(sum(v for k, v in ops.items() if k in _CONV_OPS))
        return conv, float(counter.get_total_flops()) - conv, moved.elements

    def enter(module: torch.nn.Module, _args: Any) -> None:
        module._speed_start = snapshot()

    def leave(module: torch.nn.Module, _args: Any, _out: Any) -> None:
        spent[module._speed_name] = tuple(b - a for a, b in zip(module._speed_start, snapshot()))

    groups = streaming_groups(unet)
    handles = []
    for name, module in groups:
        module._speed_name = name
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    latent = torch.zeros(1, frames, config["in_channels"], height // 8, width // 8, device="meta")
    try:
        with torch.no_grad(), counter, moved, _AttentionAsKernel(moved):
            unet(latent, torch.tensor(1.0, device="meta"),
                 encoder_hidden_states=torch.zeros(1, 1, config["cross_attention_dim"], device="meta"),
                 added_time_ids=torch.zeros(1, 3, device="meta"), return_dict=False)
            total = snapshot()
    finally:
        for handle in handles:
            handle.remove()
    costs = [GroupCost(name, *spent[name], sum(p.numel() for p in module.parameters())) for name, module in groups]
    inside = [sum(getattr(c, f) for c in costs) for f in ("conv_flops", "matmul_flops", "moved_elements")]
    outside = GroupCost("outside", *(t - i for t, i in zip(total, inside)),
                        sum(p.numel() for p in unet.parameters()) - sum(c.params for c in costs))
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
                 for m in unet.modules())
    return UNetCost((outside, *costs), layers)


def count_unet_cost(unet_config: dict[str, Any], height: int, width: int, frames: int) -> UNetCost:
    """The cost of one batch-1 UNet call of ``frames`` frames at ``height`` x ``width`` for a UNet of this config."""
    keep = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    return _count(json.dumps(keep, sort_keys=True, default=list), height, width, frames)


def count_step_flops(unet_config: dict[str, Any], height: int, width: int, frames: int, branches: int = 2) -> float:
    """FLOPs of one sampler step: ``branches`` batch elements (2 with CFG) through the UNet."""
    return branches * count_unet_cost(unet_config, height, width, frames).flops


# ---- GPU classes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuClass:
    """Datasheet peaks of one kind of card and the share of them this engine reaches (gpu_classes.json)."""

    name: str
    match: str  # regular expression on the driver's device name
    capability: tuple[int, int]
    vram_gib: float
    fp32_tflops: float
    fp16_tflops: float  # what fp16 GEMMs/convs run at in PyTorch (tensor cores, fp32 accumulation)
    tf32_tflops: float | None  # None: no TF32 tensor cores, fp32 convolutions run at fp32_tflops
    memory_gbps: float
    pcie_gbps: float
    compute_efficiency: float
    memory_efficiency: float
    pcie_efficiency: float
    efficiency_source: str
    spec_source: str

    @property
    def info(self) -> GpuInfo:
        """The card as the precision rules see it (its execution path)."""
        return GpuInfo(self.name, self.capability)


@dataclass(frozen=True)
class GpuTable:
    classes: tuple[GpuClass, ...]
    conservative: str  # the class an unknown GPU is estimated as
    call_overhead_s: float  # fixed cost of one UNet call (kernel launches, Python, hooks)
    cast_layer_s: float  # extra per layer per call when storage differs from compute (layerwise casting hooks)
    source: str

    @classmethod
    def load(cls, path: Path = GPU_CLASSES_PATH) -> "GpuTable":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        classes = tuple(GpuClass(**{**c, "capability": tuple(c["capability"])}) for c in data["classes"])
        return cls(classes, data["conservative"], data["call_overhead_s"], data["cast_layer_s"], data["source"])

    def lookup(self, gpu_name: str) -> tuple[GpuClass, bool]:
        """The class of a device name and whether it was recognised (else the conservative class)."""
        for gpu in self.classes:
            if re.search(gpu.match, gpu_name, re.IGNORECASE):
                return gpu, True
        return self.by_name(self.conservative), False

    def by_name(self, name: str) -> GpuClass:
        return next(gpu for gpu in self.classes if gpu.name == name)


# ---- what the step does ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StepConfig:
    """The facts of a run the speed model needs, as plain values (the app's settings give them:
    ``settings_adapter.step_config``)."""

    height: int
    width: int
    frames_per_call: int  # the window length with temporal windows, else the clip's frames
    windows: int  # UNet calls per branch per step
    branches: int  # 2 with classifier-free guidance
    cfg_split: bool
    offload: str  # "none" | "model" | "stream"
    compute: str  # "fp16" | "bf16" | "fp32": the UNet's compute dtype on this card
    storage_bytes: int  # per UNet parameter

    @property
    def batch(self) -> int:
        return 1 if self.cfg_split else self.branches

    @property
    def calls(self) -> int:
        return self.windows * (self.branches if self.cfg_split else 1)

    @property
    def casts_layerwise(self) -> bool:
        return self.storage_bytes != (4 if self.compute == "fp32" else 2)


def _rates(gpu: GpuClass, compute: str) -> tuple[float, float]:
    """(conv, matmul) FLOP/s reached for the compute dtype."""
    if compute == "fp32":
        conv, matmul = gpu.tf32_tflops or gpu.fp32_tflops, gpu.fp32_tflops
    else:
        conv = matmul = gpu.fp16_tflops
    return conv * 1e12 * gpu.compute_efficiency, matmul * 1e12 * gpu.compute_efficiency


def group_seconds(group: GroupCost, step: StepConfig, gpu: GpuClass) -> tuple[float, float]:
    """(compute, transfer) seconds of one group in one UNet call."""
    conv_rate, matmul_rate = _rates(gpu, step.compute)
    element_bytes = 4 if step.compute == "fp32" else 2
    moved = group.moved_elements * element_bytes * step.batch
    if step.casts_layerwise:  # each layer's weights are read in storage and written in compute dtype per call
        moved += group.params * (step.storage_bytes + element_bytes)
    compute = (step.batch * (group.conv_flops / conv_rate + group.matmul_flops / matmul_rate)
               + moved / (gpu.memory_gbps * 1e9 * gpu.memory_efficiency))
    transfer = group.params * step.storage_bytes / (gpu.pcie_gbps * 1e9 * gpu.pcie_efficiency)
    return compute, transfer


@dataclass(frozen=True)
class CardSpeed:
    """One UNet on one GPU class: what the estimate and the planner ask of the speed model."""

    unet_config: dict[str, Any]
    gpu: GpuClass
    table: GpuTable

    @classmethod
    def for_gpu(cls, unet_config: dict[str, Any], gpu_name: str, table: GpuTable | None = None) -> tuple["CardSpeed", bool]:
        """The speed of this UNet on the card the driver names, and whether the table knows that card."""
        table = table or GpuTable.load()
        gpu, known = table.lookup(gpu_name)
        return cls(dict(unet_config), gpu, table), known

    def cost(self, step: StepConfig) -> UNetCost:
        return count_unet_cost(self.unet_config, step.height, step.width, step.frames_per_call)

    def step_seconds(self, step: StepConfig) -> float:
        """Predicted seconds of one denoise step."""
        cost = self.cost(step)
        per_call = self.table.call_overhead_s + (self.table.cast_layer_s * cost.layers if step.casts_layerwise else 0.0)
        for group in cost.groups:
            compute, transfer = group_seconds(group, step, self.gpu)
            per_call += max(compute, transfer) if step.offload == "stream" else compute
        return step.calls * per_call

    def streaming_overhead(self, step: StepConfig) -> float:
        """How much longer ``step`` takes with weight streaming than with the UNet resident
        (0.05 = 5 %): ~0 where every group computes longer than its weights take to cross PCIe."""
        resident = self.step_seconds(replace(step, offload="model"))
        return self.step_seconds(replace(step, offload="stream")) / resident - 1.0

    def per_run_transfer_s(self, step: StepConfig, other_component_bytes: float) -> float:
        """Seconds to move whole components onto the card once per run (offload modes; none keeps them there)."""
        if step.offload == "none":
            return 0.0
        moved = self.cost(step).params * step.storage_bytes + other_component_bytes
        return moved / (self.gpu.pcie_gbps * 1e9 * self.gpu.pcie_efficiency)


# ---- calibration ----------------------------------------------------------------------------------
def steady_seconds_per_step(events: list[Any]) -> float | None:
    """Mean of denoise steps 2..N from a run's events: the first step carries CUDA's warm-up (kernel
    loading, cuDNN's algorithm search; 1.4 s against 0.12 steady for the demo model on the H100), which
    no later run repeats. What the estimate predicts and what calibration keeps; None below 2 steps."""
    stamps = {e.step: e.time for e in events if e.phase == Phase.DENOISE and e.step}
    last = max(stamps, default=0)
    return (stamps[last] - stamps[1]) / (last - 1) if last >= 2 and 1 in stamps else None


AtomicWriter = Callable[..., Path]  # lowvram_studio.media.write_atomically(path, write, replace=True)


@dataclass
class Measured:
    """The mean measured s/step of one key's runs, beside what the model predicted for it."""

    seconds_per_step: float
    predicted_s_per_step: float | None
    gpu: str
    runs: int = 1
    updated: float = field(default_factory=time.time)

    @property
    def ratio(self) -> float | None:
        return self.seconds_per_step / self.predicted_s_per_step if self.predicted_s_per_step else None


@dataclass
class SpeedCalibration:
    """Measured s/step per key (model, GPU, clip and the settings that change s/step: the app's
    ``speed.speed_key``), in a small JSON file (``CALIBRATION_FILE`` in the user data folder).

    The engine imports nothing outside engine/, so the caller passes the writer (``media.write_atomically``):
    a crash leaves the old or the new file, never half of one.
    """

    path: Path
    entries: dict[str, Measured] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> "SpeedCalibration":
        """The store in ``folder``; an unreadable file starts empty (logged): it only caches measurements."""
        path = Path(folder) / CALIBRATION_FILE
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))["entries"]
            entries = {str(k): Measured(**v) for k, v in raw.items()}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("speed calibration %s unreadable (%s); starting without it", path, exc)
            return cls(path)
        return cls(path, entries)

    def record(self, key: str, gpu: str, seconds_per_step: float, predicted: float | None,
               write: AtomicWriter) -> None:
        """Keep a finished run's measured s/step (the mean with earlier runs of the same ``key``) and save.

        ``predicted``: the estimate's ``predicted_s_per_step`` for the same run (the card's ratio comes from it).
        """
        old = self.entries.get(key)
        runs = old.runs + 1 if old is not None else 1
        if old is not None:
            seconds_per_step = (old.seconds_per_step * old.runs + seconds_per_step) / runs
        self.entries[key] = Measured(seconds_per_step, predicted, gpu, runs)
        text = json.dumps({"version": 1, "entries": {k: asdict(v) for k, v in self.entries.items()}}, indent=1)
        write(self.path, lambda temp: Path(temp).write_text(text, encoding="utf-8"), replace=True)

    def card_ratio(self, gpu: str) -> float | None:
        """Median measured/predicted over this card's runs: how far the table is off for this card."""
        ratios = [m.ratio for m in self.entries.values() if m.gpu == gpu and m.ratio]
        return statistics.median(ratios) if ratios else None


# ---- the estimate -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeedEstimate:
    """Seconds per step and for the clip's denoising, how they were found, and the line the studio shows."""

    seconds_per_step: float
    clip_seconds: float
    gpu_class: str
    known_gpu: bool
    basis: str  # "model" | "calibrated" (this request was measured) | "card-calibrated" (this card's ratio)
    predicted_s_per_step: float
    streaming_overhead: float | None
    text: str


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _per_step(seconds: float) -> str:
    return f"{seconds:.2f} s/step" if seconds < 1 else f"{seconds:.1f} s/step" if seconds < 10 else f"{seconds:.0f} s/step"


def estimate_speed(
    unet_config: dict[str, Any],
    step: StepConfig,
    num_inference_steps: int,
    gpu_name: str,
    key: str | None = None,
    other_component_bytes: float = 0.0,
    calibration: SpeedCalibration | None = None,
    table: GpuTable | None = None,
) -> SpeedEstimate:
    """The time estimate before Generate: s/step and the clip's denoising (+ once-per-run weight moves).

    ``gpu_name``: the driver's device name; ``key``: the calibration entry of this request (None: none
    is looked up, the card's ratio still applies); ``other_component_bytes``: VAE and image-encoder weight bytes,
    moved once per run when offloading. Encode and decode are left out (the line says "of denoising"):
    they are a small share of a run on the UNet-bound cards this is for.
    """
    card, known = CardSpeed.for_gpu(unet_config, gpu_name, table)
    predicted = card.step_seconds(step)
    seconds, basis = predicted, "model"
    if calibration is not None:
        measured = calibration.entries.get(key) if key is not None else None
        ratio = calibration.card_ratio(gpu_name)
        if measured is not None:
            seconds, basis = measured.seconds_per_step, "calibrated"
        elif ratio is not None:
            seconds, basis = predicted * ratio, "card-calibrated"
    clip = seconds * num_inference_steps + card.per_run_transfer_s(step, other_component_bytes)
    overhead = card.streaming_overhead(step) if step.offload == "stream" else None
    how = {"model": "", "calibrated": " (measured on your last run)",
           "card-calibrated": " (calibrated from your runs on this card)"}[basis]
    name = card.gpu.name if known else f"{gpu_name} (unknown GPU: estimated as a {card.gpu.name}, a slow card)"
    text = f"about {_per_step(seconds)}, about {_duration(clip)} of denoising for this clip on {name}{how}"
    return SpeedEstimate(seconds, clip, card.gpu.name, known, basis, predicted, overhead, text)
