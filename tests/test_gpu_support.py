"""The PyTorch build for each GPU and driver, the kernel check on an installed torch, nvidia-smi's output."""

from __future__ import annotations

import pytest
import torch

from lowvram_studio import gpu_support
from lowvram_studio.gpu_support import NvidiaGpu, arch_runs_on, choose_torch, installed_torch_problem, parse_nvidia_smi
from lowvram_studio.sysinfo import TorchGpuError, check_torch_runs, collect_env, format_env, torch_gpu_problem

CU126 = "https://download.pytorch.org/whl/cu126"
CU130 = "https://download.pytorch.org/whl/cu130"
CPU = "https://download.pytorch.org/whl/cpu"

GTX_1060 = NvidiaGpu("NVIDIA GeForce GTX 1060 6GB", (6, 1), (580, 95, 5))
GTX_1650 = NvidiaGpu("NVIDIA GeForce GTX 1650", (7, 5), (581, 57))
RTX_2060 = NvidiaGpu("NVIDIA GeForce RTX 2060", (7, 5), (590, 44, 1))
RTX_3060 = NvidiaGpu("NVIDIA GeForce RTX 3060", (8, 6), (550, 54, 14))
RTX_4090 = NvidiaGpu("NVIDIA GeForce RTX 4090", (8, 9), (580, 65, 6))


@pytest.mark.parametrize("system", ["posix", "nt"])
@pytest.mark.parametrize(
    ("gpu", "index", "spec", "why"),
    [
        (GTX_1060, CU126, "torch>=2.14,<2.15", "last official build with kernels"),
        (GTX_1650, CU130, "torch>=2.14", "current CUDA 13 build"),
        (RTX_2060, CU130, "torch>=2.14", "current CUDA 13 build"),
        (RTX_3060, CU126, "torch>=2.14,<2.15", "runs CUDA 12 only"),  # driver 550: CUDA 12 only
        (RTX_4090, CU130, "torch>=2.14", "current CUDA 13 build"),
    ],
    ids=["gtx1060", "gtx1650", "rtx2060", "rtx3060-driver550", "rtx4090"],
)
def test_each_card_gets_a_build_with_kernels_for_it_that_its_driver_runs(gpu, index, spec, why, system):
    choice = choose_torch(gpu, system, "win32" if system == "nt" else "linux")
    assert choice.blocker is None
    assert (choice.build.index_url, choice.build.spec) == (index, spec)
    assert arch_runs_on(choice.build.archs, gpu.capability)
    assert why in choice.why
    assert choice.pip_args() == [spec, "--index-url", index, "--extra-index-url", gpu_support.PYPI]


def test_no_gpu_gets_the_cpu_build_from_pytorchs_cpu_index_on_linux_and_pypi_on_windows():
    linux = choose_torch(None, "posix", "linux")
    assert linux.build.index_url == CPU and "no NVIDIA GPU" in linux.why
    windows = choose_torch(None, "nt", "win32")
    assert windows.build.index_url is None and windows.pip_args() == [windows.build.spec]
    assert choose_torch(None, "posix", "darwin").build.index_url is None


def test_a_driver_too_old_for_every_build_stops_with_the_version_needed_and_where_to_get_it():
    old = NvidiaGpu("NVIDIA GeForce GTX 1060 6GB", (6, 1), (470, 256, 2))
    choice = choose_torch(old, "posix")
    assert choice.build is None
    assert "470.256.2 is too old" in choice.blocker and "525.60.13" in choice.blocker
    assert gpu_support.DRIVER_DOWNLOAD_URL in choice.blocker
    blackwell = NvidiaGpu("NVIDIA GeForce RTX 5070", (12, 0), (560, 1))  # only CUDA 13 builds have sm_120
    assert "install driver 580 or newer" in choose_torch(blackwell, "nt").blocker
    windows = choose_torch(NvidiaGpu("GTX 1070", (6, 1), (472, 12)), "nt")
    assert "527.41" in windows.blocker


def test_a_gpu_older_than_every_build_gets_the_cpu_build_and_says_why():
    kepler = choose_torch(NvidiaGpu("GeForce GTX 780", (3, 5), (470, 1)), "posix")
    assert kepler.build.index_url == CPU and "sm_35" in kepler.why


def test_kernels_run_on_the_same_generation_at_a_higher_minor_and_ptx_jits_forward():
    assert arch_runs_on(["sm_60"], (6, 1))  # GTX 1060 runs Pascal sm_60 cubins
    assert arch_runs_on(["sm_86"], (8, 9))  # an RTX 4090 runs sm_86 cubins
    assert not arch_runs_on(["sm_75", "sm_80", "sm_86", "sm_90"], (6, 1))
    assert not arch_runs_on(["sm_90"], (8, 9))
    assert arch_runs_on(["sm_120", "compute_120"], (12, 1))
    assert not arch_runs_on(["compute_120"], (9, 0))
    assert arch_runs_on(["sm_90a", "garbage"], (9, 0))


def test_an_installed_torch_is_kept_only_when_it_runs_on_the_gpu():
    assert installed_torch_problem("13.0", ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], RTX_4090) is None
    problem = installed_torch_problem("13.0", ["sm_75", "sm_80", "sm_86"], GTX_1060)
    assert "no kernels for the NVIDIA GeForce GTX 1060 6GB (sm_61" in problem
    assert "CPU-only build" in installed_torch_problem(None, [], GTX_1060)
    assert installed_torch_problem(None, [], None) is None  # no GPU: any torch runs


def test_nvidia_smi_csv_is_read_and_bad_rows_are_skipped():
    text = ("name, compute_cap, driver_version\n"
            "NVIDIA GeForce GTX 1060 6GB, 6.1, 580.95.05\n"
            "NVIDIA H100 80GB HBM3, 9.0, 580.159.04\n"
            "broken row\n"
            "Odd GPU, [N/A], 580.1\n")
    gpus = parse_nvidia_smi(text)
    assert gpus == [NvidiaGpu("NVIDIA GeForce GTX 1060 6GB", (6, 1), (580, 95, 5)),
                    NvidiaGpu("NVIDIA H100 80GB HBM3", (9, 0), (580, 159, 4))]
    assert parse_nvidia_smi("") == []


def test_a_missing_nvidia_smi_is_unknown_not_a_crash(monkeypatch):
    monkeypatch.setattr(gpu_support.shutil, "which", lambda name: None)
    assert gpu_support.query_gpus() is None
    monkeypatch.setattr(gpu_support.shutil, "which", lambda name: "/bin/false")
    assert gpu_support.query_gpus() is None  # nvidia-smi that fails


def _fake_cuda_gpu(monkeypatch, capability, archs, name="NVIDIA GeForce GTX 1060 6GB"):
    """The hardware boundary: torch reports a GPU with ``capability`` and a build with ``archs``."""
    class Props:
        major, minor = capability
        total_memory = 6 * 2**30

    Props.name = name
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: Props)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
    monkeypatch.setattr(torch.version, "cuda", "13.0")


def test_info_the_cli_and_the_studio_check_say_when_torch_has_no_kernel_for_the_gpu(monkeypatch):
    _fake_cuda_gpu(monkeypatch, (6, 1), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
    env = collect_env()
    problem = torch_gpu_problem(env)
    assert "no kernels for the NVIDIA GeForce GTX 1060 6GB (sm_61" in problem
    assert 'pip install --force-reinstall "torch>=2.14,<2.15" --index-url ' + CU126 in problem
    assert f"problem: {problem}" in format_env(env)
    with pytest.raises(TorchGpuError, match="cu126"):
        check_torch_runs("auto")
    check_torch_runs("cpu")  # the CPU needs no kernels for the GPU


def test_a_torch_with_kernels_or_ptx_for_the_gpu_passes_the_check(monkeypatch):
    _fake_cuda_gpu(monkeypatch, (8, 9), ["sm_75", "sm_80", "sm_86"], name="NVIDIA GeForce RTX 4090")
    assert torch_gpu_problem(collect_env()) is None
    _fake_cuda_gpu(monkeypatch, (12, 1), ["sm_90", "compute_120"], name="NVIDIA RTX PRO")
    check_torch_runs("cuda")
