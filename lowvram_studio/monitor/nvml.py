"""All NVML (NVIDIA driver) access in one place, gpustat-style: open once, each metric fails alone.

NVML reads memory through the driver, so it never creates a CUDA context and is safe to call from
the sampler thread. Without a driver (no ``pynvml`` module, no library, no GPU) ``open_gpu`` returns
``None`` and callers fall back to CPU RAM. A metric the driver refuses (Windows WDDM, containers)
reads ``None`` ("n/a") without disturbing the others.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

LOG = logging.getLogger(__name__)
MIB = 1024 * 1024


def _pynvml() -> Any | None:
    """The ``pynvml`` module of the ``nvidia-ml-py`` distribution, or None when it is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


@dataclass(frozen=True)
class GpuInfo:
    """What the run record's ``env`` says about the GPU the monitor watches."""

    name: str | None
    driver: str | None
    total_mib: float | None
    nvml_index: int | None


class NvmlGpu:
    """One GPU seen through NVML. Create with ``open_gpu``; ``close`` releases the NVML reference."""

    def __init__(self, nvml: Any, handle: Any, index: int | None) -> None:
        self._nvml = nvml
        self._handle = handle
        self._index = index
        self._closed = False
        self._warned: set[str] = set()

    # ---- metrics: each returns None when the driver cannot tell ------------------------------
    def device_used_mib(self) -> float | None:
        """Memory used on the whole device (all processes), as ``nvidia-smi`` shows it."""
        nvml = self._nvml
        try:
            # v2 counts memory the driver reserves for itself as used, matching nvidia-smi since
            # driver 510; v1 reports it as free.
            info = nvml.nvmlDeviceGetMemoryInfo(self._handle, version=nvml.nvmlMemory_v2)
        except nvml.NVMLError as error:
            return self._failed("device used", error)
        return info.used / MIB

    def total_mib(self) -> float | None:
        nvml = self._nvml
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(self._handle, version=nvml.nvmlMemory_v2)
        except nvml.NVMLError as error:
            return self._failed("device total", error)
        return info.total / MIB

    def process_used_mib(self, pid: int) -> float | None:
        """This process's device memory (context included), None if the driver does not list it.

        Windows WDDM reports ``usedGpuMemory`` as not available (pynvml turns it into None), and in
        containers without the host PID namespace the driver lists host PIDs that never match ours.
        """
        nvml = self._nvml
        try:
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except nvml.NVMLError as error:
            return self._failed("process used", error)
        used = [p.usedGpuMemory for p in processes if p.pid == pid and p.usedGpuMemory is not None]
        return sum(used) / MIB if used else None

    def info(self) -> GpuInfo:
        nvml = self._nvml
        try:
            name = nvml.nvmlDeviceGetName(self._handle)
        except nvml.NVMLError as error:
            name = self._failed("name", error)
        try:
            driver = nvml.nvmlSystemGetDriverVersion()
        except nvml.NVMLError as error:
            driver = self._failed("driver version", error)
        return GpuInfo(name=name, driver=driver, total_mib=self.total_mib(), nvml_index=self._index)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as error:
            LOG.debug("nvmlShutdown failed: %s", error)

    def _failed(self, metric: str, error: Exception) -> None:
        if metric not in self._warned:  # a failing metric stays failing: say it once
            self._warned.add(metric)
            LOG.info("NVML cannot read %s (%s); it is shown as n/a", metric, error)
        return None


def open_gpu(cuda_index: int = 0) -> NvmlGpu | None:
    """Open the GPU that CUDA calls ``cuda_index``; None when NVML or the GPU is not there."""
    nvml = _pynvml()
    if nvml is None:
        LOG.debug("nvidia-ml-py is not installed; memory is measured as CPU RAM")
        return None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        LOG.debug("no NVIDIA driver (%s); memory is measured as CPU RAM", error)
        return None
    try:
        handle, index = _handle_for_cuda_index(nvml, cuda_index)
    except (nvml.NVMLError, IndexError, ValueError) as error:
        LOG.warning("NVML cannot find CUDA device %d (%s); memory is measured as CPU RAM", cuda_index, error)
        nvml.nvmlShutdown()
        return None
    return NvmlGpu(nvml, handle, index)


def _handle_for_cuda_index(nvml: Any, cuda_index: int) -> tuple[Any, int | None]:
    """Map a CUDA device index to an NVML handle.

    CUDA numbers devices fastest-first and after ``CUDA_VISIBLE_DEVICES``; NVML numbers them in
    PCI order. When torch has already initialised CUDA its UUID is exact; otherwise the visible
    devices list is followed (indices or ``GPU-`` UUIDs), else the index is taken as is.
    """
    uuid = _torch_uuid(cuda_index)
    if uuid is not None:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid), None
        except nvml.NVMLError as error:  # e.g. a MIG slice: its UUID is not a GPU's
            LOG.debug("NVML does not know %s (%s); mapping the CUDA index instead", uuid, error)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        entry = visible.split(",")[cuda_index].strip()
        if entry.startswith("GPU-"):
            return nvml.nvmlDeviceGetHandleByUUID(entry), None
        index = int(entry)
    else:
        index = cuda_index
    return nvml.nvmlDeviceGetHandleByIndex(index), index


def _torch_uuid(cuda_index: int) -> str | None:
    """The device UUID from torch, only if CUDA is already initialised (never initialise it here)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    uuid = getattr(torch.cuda.get_device_properties(cuda_index), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"
