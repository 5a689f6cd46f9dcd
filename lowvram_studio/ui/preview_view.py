"""The studio's live preview panel: the running job's latest latent preview as a small looping animation.

The animation is an animated WebP (14 frames of 128 px: ~15 kB and ~10 ms to encode; a GIF of the same
is ~80 kB, and Pillow's default GIF palette search takes ~200 ms) travelling inline as a data URI in a
``gr.HTML``: nothing is written to disk or served, and each preview is sent once, not on every poll.
"""

from __future__ import annotations

import base64
import io

import gradio as gr
import numpy as np
import PIL.Image

from ..engine.preview import PreviewFrames
from .worker import Job, JobState

PREVIEW_FPS = 8  # playback rate of the preview loop (the clip's own fps is a delivery setting)
WEBP_QUALITY = 80  # the preview is a blurry stand-in; this is visually lossless for it
DISPLAY_WIDTH_PX = 256  # shown at most this wide; frames are at most 128 px (engine/preview.py)
EMPTY = ""


def preview_animation(frames: np.ndarray, fps: int = PREVIEW_FPS) -> bytes:
    """uint8 frames (F, H, W, 3) -> an endlessly looping animated WebP."""
    images = [PIL.Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="WEBP", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                   loop=0, quality=WEBP_QUALITY, method=0)
    return buffer.getvalue()


def preview_caption(preview: PreviewFrames) -> str:
    every = "every step" if preview.every == 1 else f"every {preview.every} steps"
    return (f"live preview · step {preview.step}/{preview.total} · {preview.mean_ms:.1f} ms per preview "
            f"({every}; latents projected to RGB on the CPU, no VAE)")


def preview_html(preview: PreviewFrames) -> str:
    """The panel's HTML: the looping animation and what making it costs."""
    data = base64.b64encode(preview_animation(preview.frames)).decode("ascii")
    return (f'<figure id="live-preview-figure" style="margin:0">'
            f'<img src="data:image/webp;base64,{data}" alt="live preview of the clip being denoised" '
            f'style="width:100%;max-width:{DISPLAY_WIDTH_PX}px;height:auto">'
            f'<figcaption style="font-size:0.8em">{preview_caption(preview)}</figcaption></figure>')


def final_html(preview: PreviewFrames | None) -> str:
    """What stays once the decoded video is shown: the preview's measured cost only."""
    if preview is None:
        return EMPTY
    return (f'<p style="font-size:0.8em">Live preview: {preview.count} previews, '
            f"{preview.mean_ms:.1f} ms each; the decoded video is below.</p>")


class PreviewPanel:
    """Feeds one follow() loop: each new preview once, then the final note (or the last preview if stopped)."""

    def __init__(self) -> None:
        self._started = False
        self._shown: PreviewFrames | None = None

    def live(self, job: Job) -> dict:
        """The newest preview; the first call also clears what an earlier run left in the panel."""
        preview = job.preview
        if self._started and (preview is None or preview is self._shown):
            return gr.skip()
        self._started, self._shown = True, preview
        return gr.update(value=preview_html(preview) if preview is not None else EMPTY)

    def finished(self, job: Job) -> dict:
        """Done: the video replaces the preview. Stopped or failed: the last preview stays."""
        if job.state == JobState.DONE:
            return gr.update(value=final_html(job.preview))
        return self.live(job)
