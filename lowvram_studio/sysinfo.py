"""What this machine offers: versions, CUDA, GPU, VRAM, NVML — for `lowvram-studio info` and run records.

Each fact is read on its own and is ``None`` when it cannot be read, so a missing driver or package
never hides the rest.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

import torch

from .gpu_support import NvidiaGpu, choose_torch, fix_command, installed_torch_problem


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvml_facts() -> dict[str, Any]:
    """Driver, GPU names and memory from NVML; ``available: False`` with the reason when there is none."""
    try:
        import pynvml
    except ImportError as exc:
        return {"available": False, "reason": f"nvidia-ml-py is not installed ({exc})"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"no NVIDIA driver ({exc})"}
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                {
                    "index": index,
                    "name": pynvml.nvmlDeviceGetName(handle),
                    "capability": list(pynvml.nvmlDeviceGetCudaComputeCapability(handle)),
                    "total_mib": memory.total / 2**20,
                    "used_mib": memory.used / 2**20,
                }
            )
        return {"available": True, "driver": pynvml.nvmlSystemGetDriverVersion(), "gpus": gpus}
    finally:
        pynvml.nvmlShutdown()


def collect_env() -> dict[str, Any]:
    """The ``env`` block of a run record and the body of `lowvram-studio info --json`."""
    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "gradio": _version("gradio"),
        "lowvram_studio": _version("lowvram-studio"),
        "gpu": None,
        "gpu_capability": None,
        "vram_total_mib": None,
        "torch_archs": torch.cuda.get_arch_list() if torch.version.cuda else [],
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["vram_total_mib"] = props.total_memory / 2**20
    nvml = nvml_facts()
    env["nvml"] = nvml
    env["driver"] = nvml.get("driver")
    return env


def _first_gpu(env: dict[str, Any]) -> NvidiaGpu | None:
    """The GPU the runs would use, from torch when it sees one, else from NVML (a CPU-only torch sees none)."""
    nvml = env["nvml"]
    driver = tuple(int(part) for part in (nvml.get("driver") or "999").split(".") if part.isdigit())
    if env["gpu_capability"]:
        major, minor = (int(part) for part in env["gpu_capability"].split("."))
        return NvidiaGpu(env["gpu"], (major, minor), driver)
    if nvml.get("available") and nvml["gpus"] and nvml["gpus"][0].get("capability"):
        first = nvml["gpus"][0]
        return NvidiaGpu(first["name"], tuple(first["capability"]), driver)
    return None


def torch_gpu_problem(env: dict[str, Any]) -> str | None:
    """One line when this PyTorch cannot run on this machine's NVIDIA GPU, with the command that fixes it.

    Checked before any model is loaded: a build without kernels for the GPU's capability (and no PTX
    that JITs to it) fails at the first kernel with "no kernel image is available", after the load.
    """
    gpu = _first_gpu(env)
    problem = installed_torch_problem(env["torch_cuda"], env["torch_archs"], gpu)
    if problem is None:
        return None
    choice = choose_torch(gpu, os.name, sys.platform)
    if choice.blocker:
        return f"{problem}; {choice.blocker}"
    return f"{problem}; fix: {fix_command(sys.executable, choice)} (or run on the CPU with device cpu)"


class TorchGpuError(ValueError):
    """This PyTorch cannot run on this machine's GPU; the message has the command that fixes it."""


def check_torch_runs(device: str) -> None:
    """Raise ``TorchGpuError`` before a model loads when a GPU run would fail at its first kernel."""
    if getattr(device, "value", device) == "cpu":
        return
    problem = torch_gpu_problem(collect_env())
    if problem:
        raise TorchGpuError(problem)


def format_env(env: dict[str, Any]) -> str:
    lines = [
        f"Python        {env['python']} on {env['platform']}",
        f"torch         {env['torch']} (CUDA {env['torch_cuda'] or 'none'}; usable: {env['cuda_available']})",
        f"diffusers     {env['diffusers']}",
        f"transformers  {env['transformers']}",
        f"gradio        {env['gradio']}",
    ]
    nvml = env["nvml"]
    if nvml.get("available"):
        lines.append(f"NVIDIA driver {nvml['driver']}")
        for gpu in nvml["gpus"]:
            lines.append(f"GPU {gpu['index']}         {gpu['name']}: {gpu['total_mib'] / 1024:.1f} GiB, {gpu['used_mib'] / 1024:.1f} GiB in use")
    else:
        lines.append(f"NVML          n/a ({nvml['reason']}); runs use the CPU and the curve shows CPU RAM")
    problem = torch_gpu_problem(env)
    if problem:
        lines.append(f"problem: {problem}")
    return "\n".join(lines)
