"""What this machine offers: versions, CUDA, GPU, VRAM, NVML — for `lowvram-studio info` and run records.

Each fact is read on its own and is ``None`` when it cannot be read, so a missing driver or package
never hides the rest.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import Any

import torch


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


def cuda_torch_hint(env: dict[str, Any]) -> str | None:
    """The fix when an NVIDIA GPU is present but this PyTorch is a CPU-only build."""
    if env["nvml"].get("available") and not env["cuda_available"] and env["torch_cuda"] is None:
        return (
            "an NVIDIA GPU is present but this PyTorch is CPU-only; install a CUDA build: "
            f"{sys.executable} -m pip install --upgrade torch --index-url https://download.pytorch.org/whl/cu128"
        )
    return None


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
    hint = cuda_torch_hint(env)
    if hint:
        lines.append(f"hint: {hint}")
    return "\n".join(lines)
