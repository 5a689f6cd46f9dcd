"""System RAM planned before a run: the weights it keeps in host memory against what the machine has.

Users of the anchors (Wan2GP, ComfyUI) most often run out of RAM before VRAM: a CPU run, or weights
offloaded or streamed from the host, keep every component in RAM in the dtype it is stored in (pinned
for streaming, so it cannot be swapped). A run whose weights alone exceed the machine's RAM and swap is
refused with what to change; one that exceeds the RAM available now runs with a warning (the OS may
swap, or evict file-mapped weights and read them again). The decoded clip is counted too (float32 frames on the
host, twice while it is assembled there: ``decoded_clip_bytes``); activations are not: only the part that is
certain is planned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil

from ..engine.dims import ModelDims
from ..engine.options import OffloadMode
from ..engine.precision import PrecisionPolicy

GIB = 2**30


@dataclass(frozen=True)
class MachineRam:
    """The machine's memory in bytes: all of it, what is free for a new run now, and swap."""

    total: int
    available: int
    swap: int

    @classmethod
    def now(cls) -> "MachineRam":
        memory = psutil.virtual_memory()
        return cls(memory.total, memory.available, psutil.swap_memory().total)


def host_weight_bytes(dims: ModelDims, policy: PrecisionPolicy, offload: OffloadMode, on_gpu: bool) -> dict[str, int]:
    """Bytes of weights each role keeps in host RAM during the run, in its storage dtype (none stay on the
    host when a GPU holds them: the host copy is dropped after the move)."""
    if on_gpu and OffloadMode(offload) == OffloadMode.NONE:
        return {}
    params = {"denoiser": dims.unet_params, "vae": dims.vae_params, "encoder": dims.encoder_params}
    return {role: count * policy.component(role).storage.itemsize for role, count in params.items()}


def decoded_clip_bytes(frames: int, height: int, width: int) -> int:
    """Host bytes of a decoded clip at its peak: float32 RGB frames, twice while the clip is concatenated (Wan's
    decoded frames come to the CPU as they are made, engine/wan.py; every clip ends there as frames)."""
    return 2 * frames * height * width * 3 * 4


@dataclass(frozen=True)
class RamPlan:
    weights: dict[str, int]  # per role, bytes kept in host RAM
    machine: MachineRam
    where: str  # why the weights stay on the host, for messages
    clip: int = 0  # bytes of the decoded clip at its peak on the host

    @property
    def needed(self) -> int:
        return sum(self.weights.values()) + self.clip

    def _what(self) -> str:
        kept = f"{sum(self.weights.values()) / GIB:.1f} GiB of weights in RAM ({self.where})"
        return kept if not self.clip else f"{kept} and {self.clip / GIB:.1f} GiB of decoded frames"

    def refusal(self) -> str | None:
        """A message when the weights alone cannot fit RAM and swap together, else None."""
        if self.needed <= self.machine.total + self.machine.swap:
            return None
        return (f"this run keeps {self._what()} but the machine has "
                f"{self.machine.total / GIB:.1f} GiB of RAM and {self.machine.swap / GIB:.1f} GiB of swap; store the "
                "weights narrower (unet_dtype / encoder_dtype fp16, bf16 or fp8), run on a GPU with offload none, "
                "or use a smaller model")

    def warning(self) -> str | None:
        """A message when the weights exceed the RAM free now (the run may swap), else None."""
        if self.needed <= self.machine.available:
            return None
        return (f"this run keeps {self._what()} and "
                f"{self.machine.available / GIB:.1f} GiB are free now: expect swapping; close other programs or "
                "store the weights narrower")

    def to_dict(self) -> dict[str, Any]:
        return {"weights_on_host_mib": {role: round(b / 2**20) for role, b in self.weights.items()},
                "decoded_clip_mib": round(self.clip / 2**20), "needed_mib": round(self.needed / 2**20), "machine_total_mib": round(self.machine.total / 2**20),
                "machine_available_mib": round(self.machine.available / 2**20),
                "swap_mib": round(self.machine.swap / 2**20)}


def plan_ram(dims: ModelDims, policy: PrecisionPolicy, offload: OffloadMode, on_gpu: bool,
             machine: MachineRam, clip: int = 0) -> RamPlan:
    """``clip``: ``decoded_clip_bytes`` of the run (0: weights only)."""
    where = f"offload {OffloadMode(offload).value}" if on_gpu else "the run is on the CPU"
    return RamPlan(host_weight_bytes(dims, policy, offload, on_gpu), machine, where, clip)
