"""Which PyTorch build runs on which NVIDIA GPU, and whether an installed one does.

Standard library only: launch.py imports this module before anything is installed, and
`lowvram-studio info`, the CLI and the studio use the same rules at run time.

The facts behind the table (checked 2026-12 against PyTorch's and NVIDIA's own pages):
- PyTorch 2.8 release notes (github.com/pytorch/pytorch/releases/tag/v2.8.0): "Removed support for
  Maxwell, Pascal, and Volta architectures with CUDA 12.8 and 12.9 builds ... please utilize CUDA 12.6".
- pytorch/pytorch#172352 (support matrix from release 2.10): cu126 builds sm 5.0, 6.0, 7.0, 7.5, 8.0,
  8.6, 9.0; cu128 and cu130 start at Turing (sm 7.5) and add Blackwell (10.0, 12.0; +PTX on Linux).
- pytorch/pytorch#190385 and the dev-discuss notice "CUDA 12.6 wheels will no longer be published from
  PyTorch 2.15": 2.14 is the last release with any CUDA 12.x wheel (cu126, "Legacy"); 2.15 ships CUDA
  13.0 (download.pytorch.org) and 13.2 (PyPI), and CUDA 13 cannot build below sm 7.5.
- NVIDIA CUDA Compatibility, "Minor Version Compatibility": a CUDA 12.x build runs on driver >= 525
  (Linux 525.60.13, Windows 527.41), a CUDA 13.x build on driver >= 580.
So a GTX 10xx (Pascal, sm 6.1) or a Volta card gets torch 2.14.x from the cu126 index, for good.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
from dataclasses import dataclass

DRIVER_DOWNLOAD_URL = "https://www.nvidia.com/Download/index.aspx"
PYPI = "https://pypi.org/simple"


@dataclass(frozen=True)
class NvidiaGpu:
    """One row of ``nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv``."""

    name: str
    capability: tuple[int, int]
    driver: tuple[int, ...]

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    @property
    def driver_text(self) -> str:
        return ".".join(str(part) for part in self.driver)


@dataclass(frozen=True)
class TorchBuild:
    """One PyTorch wheel family: what pip installs, where from, and which GPUs and drivers it runs on."""

    key: str
    spec: str
    index_url: str | None  # None: PyPI
    archs: tuple[str, ...]  # as torch.cuda.get_arch_list() names them; () for CPU builds
    min_driver_linux: tuple[int, ...] = ()
    min_driver_windows: tuple[int, ...] = ()
    download: str = ""

    def min_driver(self, system: str) -> tuple[int, ...]:
        return self.min_driver_windows if system == "nt" else self.min_driver_linux


_CUDA13_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")
BUILDS = {
    "cu130": TorchBuild("cu130", "torch>=2.14", "https://download.pytorch.org/whl/cu130", _CUDA13_ARCHS,
                        (580,), (580,), "about 3 GB"),
    "cu126": TorchBuild("cu126", "torch>=2.14,<2.15", "https://download.pytorch.org/whl/cu126",
                        ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"),
                        (525, 60, 13), (527, 41), "about 2.5 GB"),
    "cpu-linux": TorchBuild("cpu-linux", "torch>=2.11", "https://download.pytorch.org/whl/cpu", (), download="about 0.2 GB"),
    "cpu": TorchBuild("cpu", "torch>=2.11", None, (), download="about 0.2 GB"),  # PyPI's Windows/macOS wheels are CPU builds
}
CUDA_BUILDS_NEWEST_FIRST = ("cu130", "cu126")


@dataclass(frozen=True)
class TorchChoice:
    """The build to install and one line saying why; ``blocker`` set when nothing should be installed yet."""

    build: TorchBuild | None
    why: str
    blocker: str | None = None

    def pip_args(self) -> list[str]:
        """Arguments after ``pip install``: the spec and, off PyPI, the index (PyPI stays for the other packages)."""
        assert self.build is not None, self.blocker
        if self.build.index_url is None:
            return [self.build.spec]
        return [self.build.spec, "--index-url", self.build.index_url, "--extra-index-url", PYPI]


def _parse_arch(arch: str) -> tuple[str, tuple[int, int]] | None:
    """'sm_86' -> ('sm', (8, 6)); 'compute_120' -> ('compute', (12, 0)); 'sm_90a' -> ('sm', (9, 0))."""
    match = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch.strip())
    if match is None:
        return None
    return match.group(1), (int(match.group(2)), int(match.group(3)))


def arch_runs_on(archs: list[str] | tuple[str, ...], capability: tuple[int, int]) -> bool:
    """Whether a build with these kernels runs on a GPU of ``capability``.

    A cubin (sm_XY) runs on the same major generation at the same or a higher minor version; PTX
    (compute_XY) is compiled by the driver for any GPU at or above XY (CUDA's binary compatibility rules).
    """
    for arch in archs:
        parsed = _parse_arch(arch)
        if parsed is None:
            continue
        kind, (major, minor) = parsed
        if kind == "sm" and major == capability[0] and minor <= capability[1]:
            return True
        if kind == "compute" and (major, minor) <= tuple(capability):
            return True
    return False


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def parse_nvidia_smi(text: str) -> list[NvidiaGpu]:
    """GPUs from nvidia-smi's CSV (header row first); rows it cannot read are skipped."""
    gpus = []
    rows = list(csv.reader(io.StringIO(text.strip())))
    for row in rows[1:] if rows and "name" in ",".join(rows[0]).lower() else rows:
        if len(row) < 3:
            continue
        name, capability, driver = (cell.strip() for cell in row[:3])
        cap = _version_tuple(capability)
        if len(cap) < 2 or not _version_tuple(driver):
            continue
        gpus.append(NvidiaGpu(name, (cap[0], cap[1]), _version_tuple(driver)))
    return gpus


def query_gpus(timeout_s: float = 20.0) -> list[NvidiaGpu] | None:
    """This machine's NVIDIA GPUs from nvidia-smi; None when nvidia-smi is missing or fails (unknown, not 'none')."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv"],
                              capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return parse_nvidia_smi(done.stdout)


def cpu_build(system: str, sys_platform: str = "linux") -> TorchBuild:
    """Linux takes PyTorch's CPU index (PyPI's Linux torch carries GBs of CUDA); elsewhere PyPI is CPU-only."""
    return BUILDS["cpu-linux"] if system != "nt" and sys_platform.startswith("linux") else BUILDS["cpu"]


def choose_torch(gpu: NvidiaGpu | None, system: str, sys_platform: str = "linux") -> TorchChoice:
    """The PyTorch build for this machine: the newest CUDA build with kernels for the GPU that its driver runs.

    ``gpu`` is the first NVIDIA GPU (None: no NVIDIA GPU); ``system`` is ``os.name`` ("nt" or "posix").
    """
    if gpu is None:
        return TorchChoice(cpu_build(system, sys_platform), "no NVIDIA GPU found: the CPU build of PyTorch")
    runnable = [BUILDS[key] for key in CUDA_BUILDS_NEWEST_FIRST if arch_runs_on(BUILDS[key].archs, gpu.capability)]
    if not runnable:
        return TorchChoice(cpu_build(system, sys_platform),
                           f"{gpu.name} ({gpu.sm}) is older than any current PyTorch build supports (Maxwell, "
                           "sm_50, is the oldest): the CPU build; runs will use the CPU")
    for build in runnable:
        if gpu.driver >= build.min_driver(system):
            return TorchChoice(build, _why(gpu, build, runnable[0], system))
    needed = ".".join(map(str, runnable[-1].min_driver(system)))
    newest = ".".join(map(str, runnable[0].min_driver(system)))
    also = f" (>= {newest} for the newest PyTorch)" if newest != needed else ""
    return TorchChoice(None, "", f"NVIDIA driver {gpu.driver_text} is too old for any PyTorch build that runs on "
                       f"{gpu.name}: install driver {needed} or newer{also} from {DRIVER_DOWNLOAD_URL}, "
                       "then start again")


def _why(gpu: NvidiaGpu, build: TorchBuild, newest: TorchBuild, system: str) -> str:
    if build.key == "cu126" and newest.key == "cu126":
        return (f"{gpu.name} is {gpu.sm}: CUDA 13 builds start at sm_75 and PyTorch 2.15 publishes no CUDA 12.6 "
                "wheels, so torch 2.14.x from the cu126 index is the last official build with kernels for it")
    if build is not newest:
        return (f"NVIDIA driver {gpu.driver_text} runs CUDA 12 only: torch 2.14.x (cu126); install driver "
                f"{'.'.join(map(str, newest.min_driver(system)))} or newer from {DRIVER_DOWNLOAD_URL} for current PyTorch")
    return f"{gpu.name} ({gpu.sm}) with driver {gpu.driver_text}: the current CUDA 13 build"


def installed_torch_problem(cuda: str | None, archs: list[str], gpu: NvidiaGpu | None) -> str | None:
    """Why an installed torch (its ``torch.version.cuda`` and ``torch.cuda.get_arch_list()``) cannot use ``gpu``."""
    if gpu is None:
        return None
    if cuda is None:
        return f"the installed PyTorch is a CPU-only build, so it cannot use the {gpu.name}"
    if archs and not arch_runs_on(archs, gpu.capability):
        return (f"the installed PyTorch (CUDA {cuda}) has no kernels for the {gpu.name} ({gpu.sm}; it has "
                f"{' '.join(archs)})")
    return None


def fix_command(python: str, choice: TorchChoice) -> str:
    """The one command that replaces the installed torch with the right build."""
    args = " ".join(f'"{arg}"' if any(c in arg for c in "<>") else arg for arg in choice.pip_args())
    return f"{python} -m pip install --force-reinstall {args}"
