"""Images in, videos out: input normalisation and H.264 mp4 / GIF / PNG export.

Input rule (documented for users): the image is turned upright by its EXIF orientation, converted to
RGB (transparency composited on white, 16-bit scaled to 8-bit), then scaled so it covers the target
size and centre-cropped to exactly width x height.

Output rule: a file is first written beside its final name and then linked into place, so a failed
run leaves no half-written file and an existing file is never overwritten.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

# Larger inputs are refused before decoding: 100 megapixels is ~5x an 8K frame and far past any
# useful input, while a decompression bomb claims billions.
MAX_INPUT_PIXELS = 100_000_000


class MediaError(ValueError):
    """An input or output file problem, phrased as 'what is wrong; what to do'."""


def load_image(source: str | Path | bytes | PIL.Image.Image) -> PIL.Image.Image:
    """Open and normalise an input image to upright 8-bit RGB, or raise ``MediaError``."""
    if isinstance(source, PIL.Image.Image):
        return _to_rgb(PIL.ImageOps.exif_transpose(source))
    name = "the uploaded image" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.is_file():
            raise MediaError(f"{name} does not exist or is not a file; check the path")
        if path.stat().st_size == 0:
            raise MediaError(f"{name} is empty (0 bytes); choose another image")
        data = path.read_bytes()
    else:
        data = source
        if not data:
            raise MediaError("the uploaded image is empty (0 bytes); choose another image")
    try:
        image = PIL.Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_INPUT_PIXELS:
            raise MediaError(
                f"{name} is {width}x{height} pixels, more than the {MAX_INPUT_PIXELS // 1_000_000} megapixels "
                "accepted; scale it down first"
            )
        image.load()
    except MediaError:
        raise
    except PIL.Image.DecompressionBombError as exc:
        raise MediaError(
            f"{name} claims an absurd size, over {MAX_INPUT_PIXELS // 1_000_000} megapixels (a decompression bomb?); "
            "use an ordinary image"
        ) from exc
    except PIL.UnidentifiedImageError as exc:
        raise MediaError(f"{name} is not an image PIL can read; use PNG, JPEG, WebP, BMP, TIFF or GIF") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{name} is damaged or truncated ({exc}); re-export or choose another image") from exc
    if image.width < 1 or image.height < 1:
        raise MediaError(f"{name} has no pixels; choose another image")
    return _to_rgb(PIL.ImageOps.exif_transpose(image))


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> RGB: alpha over white, 16/32-bit grey scaled down, palette expanded."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = PIL.Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def fit_image(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """Scale ``image`` to cover width x height (keeping its aspect), then centre-crop to exactly that size."""
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        PIL.Image.Resampling.LANCZOS,
    )
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (or uint8) -> uint8 (F, H, W, 3)."""
    if frames.dtype == np.uint8:
        return frames
    return np.clip(np.asarray(frames) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a temporary file in the same folder, then link it in without overwriting."""
    path = Path(path)
    if path.exists():
        raise MediaError(f"{path} already exists; choose another name or delete it first")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=folder)
        os.close(handle)
    except OSError as exc:
        raise MediaError(f"cannot write to {folder} ({exc.strerror}); choose a writable output folder") from exc
    temp = Path(temp_name)
    try:
        write(temp)
        try:
            os.link(temp, path)  # fails if `path` appeared meanwhile: never overwrites
        except FileExistsError as exc:
            raise MediaError(f"{path} already exists; choose another name or delete it first") from exc
    finally:
        temp.unlink(missing_ok=True)
    return path


def write_mp4(frames: np.ndarray, path: str | Path, fps: float, comment: str | None = None) -> Path:
    """H.264 / yuv420p mp4 that browsers play, through the ffmpeg binary imageio-ffmpeg ships.

    ``comment`` goes into the mp4's comment tag (one line; the studio stores how the video was made
    there, so a bare mp4 dropped back onto the studio restores its settings).
    """
    pixels = _check_frames(to_uint8(frames))
    if comment is not None and "\n" in comment:
        raise ValueError("an mp4 comment must be one line; serialise it without newlines")
    metadata = ["-metadata", f"comment={comment}"] if comment else []
    height, width = pixels.shape[1:3]

    def write(temp: Path) -> None:
        import imageio_ffmpeg  # only the video paths need the bundled ffmpeg

        writer = imageio_ffmpeg.write_frames(
            str(temp),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,
            bitrate=None,
            output_params=["-crf", "16", "-movflags", "+faststart", *metadata],
            macro_block_size=2,
            ffmpeg_log_level="error",
        )
        writer.send(None)
        for frame in pixels:
            writer.send(np.ascontiguousarray(frame))
        writer.close()

    return _write_atomically(Path(path), write)


def _check_frames(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[0] < 1:
        raise ValueError(f"frames must be shaped (frames, height, width, 3); got {pixels.shape}")
    return pixels


def write_gif(frames: np.ndarray, path: str | Path, fps: float) -> Path:
    pixels = _check_frames(to_uint8(frames))
    images = [PIL.Image.fromarray(frame) for frame in pixels]

    def write(temp: Path) -> None:
        images[0].save(
            temp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
        )

    return _write_atomically(Path(path), write)


def write_png_frames(frames: np.ndarray, folder: str | Path) -> list[Path]:
    """frame_0000.png ... into a new folder (which must not exist yet)."""
    folder = Path(folder)
    if folder.exists():
        raise MediaError(f"{folder} already exists; choose another folder name")
    return [
        _write_atomically(folder / f"frame_{index:04d}.png", lambda temp, f=frame: PIL.Image.fromarray(f).save(temp, format="PNG"))
        for index, frame in enumerate(to_uint8(frames))
    ]


def write_json(data: dict, path: str | Path) -> Path:
    return _write_atomically(Path(path), lambda temp: temp.write_text(json.dumps(data, indent=2), encoding="utf-8"))


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode a video to uint8 (F, H, W, 3) and its frame rate (used by tests and the UI)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3) for buffer in reader]
    return np.stack(frames), float(meta["fps"])


def read_mp4_comment(path: str | Path) -> str | None:
    """The comment tag of a video (see ``write_mp4``), or None when it has none.

    Read with the bundled ffmpeg's ``ffmetadata`` output (imageio-ffmpeg has no metadata reader and
    ships no ffprobe); its escaping of ``=;#\\`` and newlines is undone here by hand.
    """
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path} does not exist or is not a file; check the path")
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"]
    done = subprocess.run(command, capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        problem = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise MediaError(f"{path.name} is not a video ffmpeg can read ({problem[-1] if problem else 'no detail'}); "
                         "choose an mp4 made by LowVRAM Studio")
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("comment="):
            return re.sub(r"\\(.)", r"\1", line.removeprefix("comment="))
    return None


def unique_path(folder: str | Path, stem: str, suffix: str) -> Path:
    """``folder/stem.suffix``, or ``stem-2.suffix`` ... when taken: outputs never overwrite each other."""
    folder = Path(folder)
    candidate = folder / f"{stem}{suffix}"
    number = 2
    while candidate.exists():
        candidate = folder / f"{stem}-{number}{suffix}"
        number += 1
    return candidate
