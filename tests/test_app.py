"""The studio answers a real generate call through gradio_client."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from lowvram_studio.media import read_video
from lowvram_studio.ui.app import Studio, build_app, free_port

ASSET = Path(__file__).resolve().parents[1] / "assets" / "ball_and_box.png"


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory):
    studio = Studio("demo", tmp_path_factory.mktemp("outputs"))
    app = build_app(studio)
    app.queue(default_concurrency_limit=1)
    port = free_port(7900)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
               allowed_paths=[str(studio.output_dir)])
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_generate_through_gradio_client(studio_url):
    client = Client(studio_url, verbose=False)
    video, summary = client.predict(handle_file(str(ASSET)), 4, 2, 3, api_name="/generate")
    frames, _ = read_video(video["video"] if isinstance(video, dict) else video)
    assert frames.shape[0] == 4
    assert "4 frames" in summary
