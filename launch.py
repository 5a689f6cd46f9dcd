#!/usr/bin/env python3
"""Double-click entry point: set up on first start, then open LowVRAM Studio in the browser.

First start: if this Python lacks what the studio needs, a virtual environment `.venv` is made beside
this file (reusing an installed PyTorch when there is one) and the studio is installed into it with
pip's progress shown. A stamp in `.venv` remembers that set-up finished for this version of
pyproject.toml, so later starts go straight to the studio without re-checking packages.
Arguments are passed on to `lowvram-studio ui` (e.g. `python launch.py --share --auth me:secret`).
Only the standard library is used here: this file must run before anything is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
STAMP = ".lowvram-studio-ready"
MIN_PYTHON = (3, 11)
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


def torch_requirement(system: str = os.name, has_nvidia: bool | None = None) -> list[str]:
    """PyPI's torch carries CUDA on Linux; Windows needs PyTorch's CUDA index for a GPU build."""
    if has_nvidia is None:
        has_nvidia = shutil.which("nvidia-smi") is not None
    if system == "nt" and has_nvidia:
        return ["torch", "--index-url", "https://download.pytorch.org/whl/cu128",
                "--extra-index-url", "https://pypi.org/simple"]
    return ["torch"]


def set_up(venv_dir: Path = VENV) -> Path:
    """Create the venv and install the studio into it, showing each step; returns its Python."""
    print(f"First start: setting up LowVRAM Studio in {venv_dir} (this happens once; it can take several minutes).",
          flush=True)
    if not venv_python(venv_dir).exists():
        print("[1/3] creating the virtual environment ...", flush=True)
        venv.EnvBuilder(with_pip=True, system_site_packages=True).create(venv_dir)
    python = str(venv_python(venv_dir))
    if subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0:
        print("[2/3] installing PyTorch (about 2-3 GB with CUDA) ...", flush=True)
        subprocess.check_call([python, "-m", "pip", "install", "--progress-bar", "on", *torch_requirement()])
    print("[3/3] installing LowVRAM Studio and its libraries ...", flush=True)
    subprocess.check_call([python, "-m", "pip", "install", "--progress-bar", "on", "-e", str(HERE)])
    (venv_dir / STAMP).write_text(requirements_stamp())
    print("Set-up finished; next starts are quick.", flush=True)
    return venv_python(venv_dir)


def start_studio(args: list[str]) -> int:
    """Run the studio in this Python (everything it needs is importable here)."""
    sys.path.insert(0, str(HERE))
    from lowvram_studio.cli import main as cli_main
    from lowvram_studio.sysinfo import collect_env, cuda_torch_hint

    hint = cuda_torch_hint(collect_env())
    if hint:
        print(f"hint: {hint}", flush=True)
    return cli_main(["ui", *args])


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else args
    problem = python_problem()
    if problem:
        print(problem)
        return 1
    if not missing_modules():
        return start_studio(args)
    if Path(sys.prefix).resolve() == VENV.resolve():
        print(f"Still missing after set-up: {', '.join(missing_modules())}. Delete {VENV} and start launch.py again.")
        return 1
    try:
        python = venv_python() if venv_ready() else set_up()
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"Set-up failed ({exc}). Check your internet connection and disk space, then start launch.py again.")
        return 1
    return subprocess.call([str(python), str(Path(__file__).resolve()), *args])


def _pause_if_double_clicked(code: int) -> int:
    """A double-clicked console window on Windows closes at once; keep an error readable."""
    if code and os.name == "nt" and sys.stdin is not None and sys.stdin.isatty():
        input("Press Enter to close this window.")
    return code


if __name__ == "__main__":
    sys.exit(_pause_if_double_clicked(main()))
