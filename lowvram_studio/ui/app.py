"""The studio: a Gradio Blocks app over the same engine the CLI uses.

Functions first, then the layout, then the wiring; nothing runs at import.
"""

from __future__ import annotations

import argparse
import logging
import socket
import tempfile
import threading
from pathlib import Path

import gradio as gr

from ..jobs import run_job
from ..media import MediaError, load_image, unique_path
from ..models.load import LoadedModel, ModelError, load_model, native_size
from ..settings import RunSettings, SettingsError

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[2] / "assets"


class Studio:
    """The loaded model and the output folder one studio process works with."""

    def __init__(self, model_source: str, output_dir: Path):
        self.model_source = model_source
        self.output_dir = output_dir
        self._model: LoadedModel | None = None
        self._lock = threading.Lock()  # one GPU job at a time

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            self._model = load_model(self.model_source)
        return self._model

    def generate(self, image_path: str | None, frames: int, steps: int, seed: int) -> tuple[str, str]:
        """Run one job; every user-fixable problem becomes a ``gr.Error`` with the fix."""
        if not image_path:
            raise gr.Error("No input image; drop an image or pick an example first.")
        try:
            image = load_image(image_path)
            height, width, _ = native_size(self.model.pipeline)
            settings = RunSettings(
                height=height, width=width, num_frames=int(frames), num_inference_steps=int(steps), seed=int(seed)
            ).validate()
            with self._lock:
                output = run_job(self.model, image, settings, unique_path(self.output_dir, "video", ".mp4"))
        except (MediaError, ModelError, SettingsError) as exc:
            raise gr.Error(str(exc)) from exc
        result = output.result
        summary = (
            f"{result.frames.shape[0]} frames at {settings.width}x{settings.height} in {result.seconds_total:.1f} s "
            f"({result.seconds_per_step:.2f} s/step on {result.device}). Record: {output.record_path.name}"
        )
        return str(output.video), summary


def build_app(studio: Studio) -> gr.Blocks:
    examples = sorted(str(p) for p in ASSETS.glob("*.png"))
    with gr.Blocks(title="LowVRAM Studio") as app:
        gr.Markdown("# LowVRAM Studio\nImage to video with Stable Video Diffusion on small GPUs.")
        if studio.model.note:
            gr.Markdown(f"**Note:** {studio.model.note}")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Input image")
                gr.Examples(examples, inputs=image)
                frames = gr.Slider(2, 64, value=studio.model.pipeline.unet.config.num_frames, step=1, label="Frames")
                steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                seed = gr.Number(value=0, precision=0, label="Seed")
                generate = gr.Button("Generate", variant="primary")
            with gr.Column():
                video = gr.Video(label="Video")
                summary = gr.Markdown()
        generate.click(studio.generate, inputs=[image, frames, steps, seed], outputs=[video, summary], api_name="generate")
    return app


def free_port(start: int = 7860, tries: int = 100) -> int:
    """The first port from ``start`` that nothing listens on locally."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise OSError(f"no free port between {start} and {start + tries - 1}; close other servers or pass --port")


def launch_studio(args: argparse.Namespace) -> int:
    output_dir = Path(tempfile.gettempdir()) / "lowvram-studio-outputs"
    output_dir.mkdir(parents=True, exist_ok=True)
    studio = Studio(args.model, output_dir)
    app = build_app(studio)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name="0.0.0.0" if args.listen else "127.0.0.1",
        server_port=args.port or free_port(),
        inbrowser=not args.no_browser,
        allowed_paths=[str(output_dir), str(ASSETS)],
    )
    return 0
