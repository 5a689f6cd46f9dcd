"""The memory sampler: rate, clean stop, per-metric failure, CPU fallback, cost.

NVML is faked only at the ``pynvml`` boundary (this machine has no NVIDIA driver); the real NVML
path is proven by bench/compare.py on a GPU.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import timeit
from types import SimpleNamespace

import pynvml
import pytest
import torch

from lowvram_studio.monitor import vram
from lowvram_studio.monitor.nvml import MIB, open_gpu
from lowvram_studio.monitor.vram import (
    CPU_RAM,
    THREAD_NAME,
    VRAM,
    IdleBaseline,
    MonitorConfig,
    Sample,
    VramMonitor,
    measure_idle_baseline,
    offer_monitor,
    process_peak_mib,
    take_offered_monitor,
)


class FakeDriver:
    """Stands in for the NVIDIA driver behind pynvml: memory figures the test controls."""

    def __init__(self, device_used_mib: float = 1000.0, process_used_mib: float | None = 600.0) -> None:
        self.device_used_mib = device_used_mib
        self.process_used_mib = process_used_mib
        self.fail: set[str] = set()
        self.shutdowns = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "FakeDriver":
        def maybe_fail(name: str) -> None:
            if name in self.fail:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

        def memory_info(handle, version=None):
            maybe_fail("memory")
            assert version == pynvml.nvmlMemory_v2
            return SimpleNamespace(used=int(self.device_used_mib * MIB), total=80 * 1024 * MIB)

        def processes(handle):
            maybe_fail("processes")
            used = None if self.process_used_mib is None else int(self.process_used_mib * MIB)
            return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=used), SimpleNamespace(pid=1, usedGpuMemory=5 * MIB)]

        def shutdown():
            self.shutdowns += 1

        monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
        monkeypatch.setattr(pynvml, "nvmlShutdown", shutdown)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: f"gpu{index}")
        monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", memory_info)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", processes)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda handle: "Fake GPU 6GB")
        monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "999.1")
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        return self


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def test_sampler_records_at_its_rate_and_stops_cleanly():
    monitor = VramMonitor(MonitorConfig(rate_hz=50))
    with monitor:
        time.sleep(0.6)
        assert monitor.running
    samples = monitor.samples
    assert not monitor.running and not monitor_threads()
    duration = samples[-1].t - samples[0].t
    # deadline schedule: never more than one sample per tick; a loaded 2-core box may skip a few
    assert 0.6 * 50 * duration <= len(samples) <= 50 * duration + 2
    assert all(b.t > a.t for a, b in zip(samples, samples[1:]))
    assert monitor.started_at <= samples[0].t and samples[-1].t <= monitor.stopped_at


def test_an_offered_monitor_goes_to_one_run_inside_the_block_only_while_it_runs():
    assert take_offered_monitor() is None
    with VramMonitor() as monitor:
        with offer_monitor(monitor):
            assert take_offered_monitor() is monitor
            assert take_offered_monitor() is None  # a second run in the block starts its own
        assert take_offered_monitor() is None  # only inside the block
    with offer_monitor(monitor):
        assert take_offered_monitor() is None  # a stopped monitor records nothing more
    assert not monitor_threads()


def test_stop_is_idempotent_and_a_monitor_records_one_run():
    monitor = VramMonitor()
    monitor.stop()  # before start: nothing to do
    monitor.start()
    monitor.stop()
    count = len(monitor.samples)
    monitor.stop()
    assert len(monitor.samples) == count
    with pytest.raises(RuntimeError, match="create a new VramMonitor"):
        monitor.start()
    assert not monitor_threads()


def test_monitor_stops_when_the_run_raises():
    with pytest.raises(ZeroDivisionError):
        with VramMonitor():
            1 / 0
    assert not monitor_threads()


def test_rate_below_20_hz_is_refused_with_the_limit():
    with pytest.raises(ValueError, match="at least 20"):
        VramMonitor(MonitorConfig(rate_hz=5))


def test_without_nvml_the_curve_is_cpu_ram():
    # this machine has no NVIDIA driver: the real pynvml raises NVMLError on nvmlInit
    assert open_gpu() is None
    with VramMonitor() as monitor:
        time.sleep(0.1)
    assert monitor.memory_label == CPU_RAM
    sample = monitor.samples[-1]
    assert sample.rss_mib > 10
    assert sample.device_used_mib is None and sample.process_used_mib is None
    peaks = monitor.peaks(measure_idle_baseline())
    assert peaks["ram_peak_mib"] >= sample.rss_mib * 0.5
    assert peaks["process_peak_mib"] is None and peaks["device_peak_mib"] is None and peaks["torch_peak_mib"] is None


def test_without_the_pynvml_module_the_monitor_still_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    with VramMonitor() as monitor:
        time.sleep(0.05)
    assert monitor.memory_label == CPU_RAM and monitor.samples[-1].rss_mib is not None


def test_sampler_never_initialises_cuda():
    with VramMonitor() as monitor:
        time.sleep(0.05)
    assert not torch.cuda.is_initialized()
    assert all(s.torch_allocated_mib is None and s.torch_reserved_mib is None for s in monitor.samples)


def test_nvml_figures_are_recorded_per_process_and_device(monkeypatch):
    driver = FakeDriver(device_used_mib=1000, process_used_mib=600).install(monkeypatch)
    with VramMonitor() as monitor:
        time.sleep(0.05)
        driver.device_used_mib, driver.process_used_mib = 3000, 2500
        time.sleep(0.08)
    assert monitor.memory_label == VRAM
    assert monitor.gpu_info.name == "Fake GPU 6GB" and monitor.gpu_info.driver == "999.1"
    assert monitor.gpu_info.total_mib == 80 * 1024
    peaks = monitor.peaks()
    assert peaks["process_peak_mib"] == pytest.approx(2500)  # only our pid counts, not pid 1
    assert peaks["device_peak_mib"] == pytest.approx(3000)
    assert peaks["ram_peak_mib"] > 0
    assert driver.shutdowns == 1


def test_each_nvml_metric_fails_on_its_own(monkeypatch):
    driver = FakeDriver().install(monkeypatch)
    driver.fail.add("processes")
    with VramMonitor() as monitor:
        time.sleep(0.05)
    sample = monitor.samples[-1]
    assert sample.process_used_mib is None
    assert sample.device_used_mib == pytest.approx(1000)
    assert sample.rss_mib is not None


def test_hidden_processes_fall_back_to_device_used_minus_idle_baseline(monkeypatch):
    # Windows WDDM: pynvml reports usedGpuMemory None for every process
    driver = FakeDriver(device_used_mib=800, process_used_mib=None).install(monkeypatch)
    baseline = measure_idle_baseline()
    assert baseline.device_used_mib == pytest.approx(800) and baseline.process_used_mib is None
    with VramMonitor() as monitor:
        time.sleep(0.03)
        driver.device_used_mib = 2800
        time.sleep(0.06)
    assert monitor.peaks(baseline)["process_peak_mib"] == pytest.approx(2000)
    assert monitor.peaks(None)["process_peak_mib"] is None  # no baseline: not measured, not guessed


def test_process_peak_prefers_the_driver_per_process_figure():
    samples = [Sample(t=0, device_used_mib=5000, process_used_mib=900), Sample(t=1, device_used_mib=5200, process_used_mib=1100)]
    baseline = IdleBaseline(device_used_mib=4000, process_used_mib=None, torch_reserved_mib=None, rss_mib=None)
    assert process_peak_mib(samples, baseline) == 1100


def test_a_baseline_taken_after_cuda_started_is_not_subtracted():
    # it holds our own context and weights: subtracting it would understate the process peak
    samples = [Sample(t=0, device_used_mib=5000)]
    late = IdleBaseline(device_used_mib=4000, process_used_mib=None, torch_reserved_mib=3000, rss_mib=None, cuda_initialized=True)
    assert process_peak_mib(samples, late) is None
    assert process_peak_mib(samples, late, device_baseline_mib=500) == 4500


def test_sampler_costs_under_one_percent_of_a_run():
    # Count the work instead of timing the run: how many readings the sampler made while the
    # "run" (a busy main thread) lasted, times what one reading costs.
    config = MonitorConfig(rate_hz=50)
    reader = vram._Reader(None, 0)
    seconds_per_reading = min(timeit.repeat(reader.read, number=200, repeat=3)) / 200
    with VramMonitor(config) as monitor:
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            sum(range(1000))
    wall = monitor.stopped_at - monitor.started_at
    readings = len(monitor.samples)
    assert readings <= config.rate_hz * wall + 2  # no busy loop, no burst after a stall
    assert readings * seconds_per_reading / wall < 0.01


def test_once_cuda_is_up_torch_figures_are_read_and_the_gpu_found_by_uuid(monkeypatch):
    # Fakes at the hardware boundary only: the driver (pynvml) and torch's CUDA queries.
    FakeDriver().install(monkeypatch)
    asked = []
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", lambda uuid: asked.append(uuid) or "gpu-by-uuid")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid="1234abcd-0000"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 300 * MIB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 512 * MIB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: 700 * MIB)
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    with VramMonitor(MonitorConfig(cuda_index=0)) as monitor:
        time.sleep(0.03)
    assert asked == ["GPU-1234abcd-0000"] and resets == [0]
    sample = monitor.samples[-1]
    assert (sample.torch_allocated_mib, sample.torch_reserved_mib) == (300, 512)
    assert monitor.peaks()["torch_peak_mib"] == 700
    assert measure_idle_baseline().cuda_initialized
