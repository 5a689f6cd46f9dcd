"""launch.py: Python check, quick second start, the CUDA wheel choice, and a real start of the studio."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import launch  # noqa: E402


def test_an_old_python_is_refused_with_what_to_install(monkeypatch, capsys):
    assert launch.python_problem((3, 11)) is None
    monkeypatch.setattr(launch, "MIN_PYTHON", (99, 0))
    assert launch.main([]) == 1
    assert "needs Python 99.0 or newer" in capsys.readouterr().out


def test_a_second_start_skips_set_up_only_while_the_stamp_matches(tmp_path):
    assert not launch.venv_ready(tmp_path)
    python = launch.venv_python(tmp_path)
    python.parent.mkdir(parents=True)
    python.write_text("")
    (tmp_path / launch.STAMP).write_text(launch.requirements_stamp())
    assert launch.venv_ready(tmp_path)
    (tmp_path / launch.STAMP).write_text("an older pyproject.toml")
    assert not launch.venv_ready(tmp_path)


def test_windows_with_an_nvidia_gpu_gets_the_cuda_build_of_torch():
    assert "https://download.pytorch.org/whl/cu128" in launch.torch_requirement("nt", has_nvidia=True)
    assert launch.torch_requirement("nt", has_nvidia=False) == ["torch"]
    assert launch.torch_requirement("posix", has_nvidia=True) == ["torch"]


@pytest.mark.skipif(bool(launch.missing_modules()), reason="the studio's dependencies are not installed here")
def test_launch_starts_the_studio_on_the_given_port_without_set_up(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "LOWVRAM_STUDIO_CONFIG_DIR": str(tmp_path / "config"),
           "LOWVRAM_STUDIO_OUTPUTS": str(tmp_path / "outputs")}
    started = time.time()
    process = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--no-browser", "--port", str(port)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while time.time() - started < 120 and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.ConnectError:
                time.sleep(0.5)
        assert process.poll() is None, process.stdout.read()
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
        assert not (ROOT / ".venv").exists() or launch.venv_ready()  # nothing was installed for this start
    finally:
        process.terminate()
        process.wait(30)
    assert (tmp_path / "outputs").is_dir()
