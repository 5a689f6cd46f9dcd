#!/usr/bin/env python3
"""Double-click entry point: set up on first start, then open LowVRAM Studio in the browser.

First start: if this Python lacks what the studio needs, a virtual environment `.venv` is made beside
this file (reusing an installed PyTorch when there is one) and the studio is installed into it with
pip's progress shown. A stamp in `.venv` remembers that set-up finished for this version of
pyproject.toml, so later starts go straight to the studio without re-checking packages.
The PyTorch build is chosen for this machine's GPU (lowvram_studio/gpu_support.py says which and why);
`--reinstall-torch` replaces an installed torch that cannot use the GPU without asking.
Other arguments are passed on to `lowvram-studio ui` (e.g. `python launch.py --share --auth me:secret`).
Only the standard library is used here: this file must run before anything is installed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
STAMP = ".lowvram-studio-ready"
REINSTALL_TORCH = "--reinstall-torch"
MIN_PYTHON = (3, 11)
sys.path.insert(0, str(HERE))
from lowvram_studio import gpu_support  # noqa: E402  (standard library only, like this file)

NEEDED = ("torch", "diffusers", "transformers", "accelerate", "gradio", "pynvml", "imageio_ffmpeg", "cv2", "skimage",
          "psutil", "pandas", "matplotlib")


def python_problem(version: tuple[int, int] = sys.version_info[:2]) -> str | None:
    if version >= MIN_PYTHON:
        return None
    return (f"LowVRAM Studio needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; this is {version[0]}.{version[1]}. "
            "Install a newer Python from python.org and start launch.py with it.")


def missing_modules() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def venv_python(venv_dir: Path = VENV) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def requirements_stamp() -> str:
    """Changes when pyproject.toml (the dependency list) changes, so an update re-runs set-up."""
    return hashlib.sha256((HERE / "pyproject.toml").read_bytes()).hexdigest()


def venv_ready(venv_dir: Path = VENV) -> bool:
    """True when set-up finished in ``venv_dir`` for the current pyproject.toml (no imports: instant)."""
    stamp = venv_dir / STAMP
    return venv_python(venv_dir).exists() and stamp.is_file() and stamp.read_text().strip() == requirements_stamp()


def detect_gpu() -> tuple["gpu_support.NvidiaGpu | None", str | None]:
    """The first NVIDIA GPU and, when nvidia-smi could not tell, a note saying what was assumed."""
    gpus = gpu_support.query_gpus()
    if gpus is None:
        return None, ("nvidia-smi is missing or failed, so this looks like a machine without an NVIDIA GPU; if it "
                      f"has one, install its driver from {gpu_support.DRIVER_DOWNLOAD_URL} and start launch.py "
                      "again with --reinstall-torch")
    return (gpus[0] if gpus else None), None


def installed_torch(python: str) -> dict | None:
    """Version, CUDA version and kernel list of the torch that ``python`` imports; None when there is none."""
    probe = ("import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda, "
             "'archs': torch.cuda.get_arch_list() if torch.version.cuda else []}))")
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def download_size(python: str, pip_args: list[str]) -> str | None:
    """What pip would download for ``pip_args``, from its dry-run report and the files' Content-Length."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        done = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                               "--report", str(report), *pip_args], capture_output=True, text=True)
        if done.returncode != 0 or not report.is_file():
            return None
        urls = [item["download_info"]["url"] for item in json.loads(report.read_text())["install"]]
    total = 0
    for url in urls:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=20) as reply:
                total += int(reply.headers.get("Content-Length") or 0)
        except (OSError, ValueError):
            return None
    return f"{total / 1e9:.1f} GB" if total >= 1e8 else f"{total / 1e6:.0f} MB"


def ensure_torch(python: str, reinstall: bool, ask=input) -> bool:
    """Install the PyTorch build for this machine's GPU into ``python``'s environment, keeping one that runs.

    A torch that cannot use the GPU is replaced only with ``reinstall`` or after the user says yes.
    Returns False when set-up must stop: the driver is too old for any build that runs on the GPU.
    """
    gpu, note = detect_gpu()
    if note:
        print(f"note: {note}", flush=True)
    choice = gpu_support.choose_torch(gpu, os.name, sys.platform)
    if choice.blocker:
        print(f"error: {choice.blocker}", flush=True)
        return False
    current = installed_torch(python)
    if current is not None:
        problem = gpu_support.installed_torch_problem(current["cuda"], current["archs"], gpu)
        if problem is None:
            print(f"[2/3] keeping the installed PyTorch {current['version']} (it runs on this machine)", flush=True)
            return True
        print(f"note: {problem}.", flush=True)
        if not reinstall:
            answer = ask(f"Replace it with {choice.build.spec} from {choice.build.index_url or 'PyPI'}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("Keeping it; runs will use the CPU. Start launch.py with --reinstall-torch to replace it later.",
                      flush=True)
                return True
    size = download_size(python, choice.pip_args()) or choice.build.download
    print(f"[2/3] installing PyTorch {choice.build.spec} ({size} to download): {choice.why}", flush=True)
    reinstalling = ["--force-reinstall"] if current is not None else []
    subprocess.check_call([python, "-m", "pip", "install", "--progress-bar", "on", *reinstalling, *choice.pip_args()])
    return True


def set_up(venv_dir: Path = VENV, reinstall_torch: bool = False) -> Path | None:
    """Create the venv and install the studio into it, showing each step; returns its Python (None: stopped)."""
    print(f"First start: setting up LowVRAM Studio in {venv_dir} (this happens once; it can take several minutes).",
          flush=True)
    if not venv_python(venv_dir).exists():
        print("[1/3] creating the virtual environment ...", flush=True)
        venv.EnvBuilder(with_pip=True, system_site_packages=True).create(venv_dir)
    python = str(venv_python(venv_dir))
    if not ensure_torch(python, reinstall_torch):
        return None
    print("[3/3] installing LowVRAM Studio and its libraries ...", flush=True)
    subprocess.check_call([python, "-m", "pip", "install", "--progress-bar", "on", "-e", str(HERE)])
    (venv_dir / STAMP).write_text(requirements_stamp())
    print("Set-up finished; next starts are quick.", flush=True)
    return venv_python(venv_dir)


def start_studio(args: list[str]) -> int:
    """Run the studio in this Python (everything it needs is importable here)."""
    from lowvram_studio.cli import main as cli_main
    from lowvram_studio.sysinfo import collect_env, torch_gpu_problem

    problem = torch_gpu_problem(collect_env())
    if problem:
        print(f"warning: {problem}", flush=True)
    return cli_main(["ui", *args])


def _die_with_parent(launcher_pid: int) -> None:
    """Linux: the studio gets SIGTERM when the launcher dies, even by kill -9 (prctl PR_SET_PDEATHSIG).

    Runs in the child between fork and exec. A launcher killed before the prctl took effect would leave
    the child orphaned with no signal to come (seen in CI: kill -9 right after the fork), so the child
    checks that its parent is still the launcher once the signal is armed, and ends itself if not."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def run_child(command: list[str]) -> int:
    """Run the studio in the venv's Python; stopping the launcher (Ctrl+C, SIGTERM, kill -9) stops it too."""
    import signal

    guard = functools.partial(_die_with_parent, os.getpid()) if sys.platform.startswith("linux") else None
    child = subprocess.Popen(command, preexec_fn=guard)

    def forward(signum, _frame):
        child.terminate()

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # the child got Ctrl+C too and shuts down; wait for it
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
        if child.poll() is None:
            child.terminate()


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else args
    reinstall = REINSTALL_TORCH in args
    args = [arg for arg in args if arg != REINSTALL_TORCH]
    problem = python_problem()
    if problem:
        print(problem)
        return 1
    try:
        if not missing_modules():
            if reinstall and not ensure_torch(sys.executable, reinstall=True):
                return 1
            return start_studio(args)
        if Path(sys.prefix).resolve() == VENV.resolve():
            print(f"Still missing after set-up: {', '.join(missing_modules())}. Delete {VENV} and start launch.py again.")
            return 1
        if venv_ready() and reinstall:
            ready = ensure_torch(str(venv_python()), reinstall=True)
            python = venv_python() if ready else None
        else:
            python = venv_python() if venv_ready() else set_up(reinstall_torch=reinstall)
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"Set-up failed ({exc}). Check your internet connection and disk space, then start launch.py again.")
        return 1
    if python is None:
        return 1
    return run_child([str(python), str(Path(__file__).resolve()), *args])


def _pause_if_double_clicked(code: int) -> int:
    """A double-clicked console window on Windows closes at once; keep an error readable."""
    if code and os.name == "nt" and sys.stdin is not None and sys.stdin.isatty():
        input("Press Enter to close this window.")
    return code


if __name__ == "__main__":
    sys.exit(_pause_if_double_clicked(main()))
