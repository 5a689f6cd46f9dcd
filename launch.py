#!/usr/bin/env python3
"""Double-click entry point: set up on first start, then open LowVRAM Studio in the browser.

First start: if this Python lacks what the studio needs, a virtual environment `.venv` is made beside
this file (reusing an installed PyTorch when there is one) and the studio is installed into it with
pip's progress shown. Later starts find everything and go straight to the studio.
Arguments are passed on to `lowvram-studio ui` (e.g. `python launch.py --share --auth me:secret`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
MIN_PYTHON = (3, 11)
NEEDED = ("torch", "diffusers", "transformers", "accelerate", "gradio", "pynvml", "imageio_ffmpeg", "cv2", "skimage")


def missing_modules() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def torch_requirement() -> list[str]:
    """PyPI's torch carries CUDA on Linux; Windows needs PyTorch's CUDA index for a GPU build."""
    has_nvidia = shutil.which("nvidia-smi") is not None
    if os.name == "nt" and has_nvidia:
        return ["torch", "--index-url", "https://download.pytorch.org/whl/cu128", "--extra-index-url", "https://pypi.org/simple"]
    return ["torch"]


def set_up() -> Path:
    """Create .venv and install the studio into it; returns its Python."""
    print(f"First start: setting up LowVRAM Studio in {VENV} (this happens once) ...", flush=True)
    if not venv_python().exists():
        venv.EnvBuilder(with_pip=True, system_site_packages=True).create(VENV)
    python = str(venv_python())
    if subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0:
        subprocess.check_call([python, "-m", "pip", "install", "--progress-bar", "on", *torch_requirement()])
    subprocess.check_call([python, "-m", "pip", "install", "--progress-bar", "on", "-e", str(HERE)])
    return venv_python()


def main() -> int:
    if sys.version_info < MIN_PYTHON:
        print(f"LowVRAM Studio needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; this is {sys.version.split()[0]}. "
              "Install a newer Python from python.org and start launch.py with it.")
        return 1
    args = sys.argv[1:]
    if not missing_modules():
        sys.path.insert(0, str(HERE))
        from lowvram_studio.cli import main as cli_main

        return cli_main(["ui", *args])
    in_venv = Path(sys.prefix).resolve() == VENV.resolve()
    if in_venv:
        print(f"Still missing after set-up: {', '.join(missing_modules())}. Delete {VENV} and start again.")
        return 1
    try:
        python = venv_python() if venv_python().exists() else set_up()
        if subprocess.run([str(python), "-c", f"import {', '.join(NEEDED)}"], capture_output=True).returncode != 0:
            python = set_up()
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"Set-up failed ({exc}). Check your internet connection and disk space, then start launch.py again.")
        return 1
    return subprocess.call([str(python), str(Path(__file__).resolve()), *args])


if __name__ == "__main__":
    sys.exit(main())
