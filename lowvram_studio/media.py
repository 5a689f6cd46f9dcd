"""Images in, videos out: input normalisation and H.264 mp4 / GIF / PNG export.

Input rule (documented for users): the image is turned upright by its EXIF orientation, converted to
RGB (transparency composited on white, 16-bit scaled to 8-bit), then scaled so it covers the target
size and centre-cropped to exactly width x height.

Output rule: a file is first written to a marked temporary file beside its final name, its writer's
status is checked, and only then is it linked into place: nothing half-written ever carries a final
name and an existing file is never overwritten. Temporaries are removed when a write fails, and those
of a killed process are swept by ``sweep_partial_outputs`` when the next job starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import psutil

# Larger inputs are refused before decoding: 100 megapixels is ~5x an 8K frame and far past any
# useful input, while a decompression bomb claims billions.
MAX_INPUT_PIXELS = 100_000_000

# Temporary files are named ".STEM.PID.RANDOM.partial.SUFFIX" (the suffix last: ffmpeg picks the
# container by it); the writer's process id tells a killed writer's leftovers from a live one's.
PARTIAL_NAME = re.compile(r"^\..*\.(?P<pid>\d+)\.[a-z0-9_]{8}\.partial(\.[^.]*)?$")


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


def write_atomically(path: str | Path, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Have ``write`` fill a marked temporary file beside ``path``, then put it in place: all or nothing.

    New outputs are hard-linked in, which fails with ``FileExistsError`` when ``path`` exists, even one
    that appeared during the write; files the studio rewrites (its queue, settings) pass ``replace=True``
    for ``os.replace``. The temporary file is gone afterwards however ``write`` ends; OSErrors propagate.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}.", suffix=f".partial{path.suffix}",
                                    dir=path.parent)
    os.close(handle)
    temp = Path(name)
    try:
        write(temp)
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def _write_output(path: Path, write: Callable[[Path], None]) -> Path:
    """``write_atomically`` for a new output file, its failures phrased for the user."""
    if path.exists():
        raise MediaError(f"{path} already exists; choose another name or delete it first")
    try:
        return write_atomically(path, write)
    except FileExistsError as exc:
        raise MediaError(f"{path} already exists; choose another name or delete it first") from exc
    except OSError as exc:
        raise MediaError(f"could not write {path} ({exc.strerror or exc}); free some disk space or choose a "
                         "writable output folder") from exc


def sweep_partial_outputs(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder``; returns what was deleted.

    A temporary file is stale when the process named in it is gone, or started after the file was last
    written (its id was reused). Live writers' files, and every file not named like ours, are kept.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    swept = []
    for path in folder.iterdir():
        match = PARTIAL_NAME.match(path.name)
        if match is None or not path.is_file() or _writer_alive(int(match["pid"]), path.stat().st_mtime):
            continue
        path.unlink(missing_ok=True)
        swept.append(path)
    return swept


def _writer_alive(pid: int, written_at: float) -> bool:
    # Start times are only good to about a second (Linux counts from a boot time in whole seconds).
    try:
        return psutil.Process(pid).create_time() <= written_at + 2.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's live process
        return True


def write_mp4(
    frames: np.ndarray,
    path: str | Path,
    fps: float,
    comment: str | None = None,
    check_stop: Callable[[], None] | None = None,
) -> Path:
    """H.264 / yuv420p mp4 that browsers play, through the ffmpeg binary imageio-ffmpeg ships.

    ``comment`` goes into the mp4's comment tag (one line; the studio stores how the video was made
    there, so a bare mp4 dropped back onto the studio restores its settings). ``check_stop`` is called
    before each frame is handed to the encoder; whatever it raises (a stopped run) ends the encoder and
    leaves no file behind.
    """
    pixels = _check_frames(to_uint8(frames))
    if comment is not None and "\n" in comment:
        raise ValueError("an mp4 comment must be one line; serialise it without newlines")
    height, width = pixels.shape[1:3]
    if width % 2 or height % 2:
        raise ValueError(f"an mp4 (yuv420p) needs an even width and height; got {width}x{height}")
    metadata = ["-metadata", f"comment={comment}"] if comment else []
    path = Path(path)
    return _write_output(path, lambda temp: _encode_h264(pixels, temp, fps, metadata, path, check_stop))


def _encode_h264(
    pixels: np.ndarray,
    temp: Path,
    fps: float,
    output_params: list[str],
    path: Path,
    check_stop: Callable[[], None] | None,
) -> None:
    """Pipe the frames through ffmpeg one by one and check how it ended.

    Not imageio-ffmpeg's ``write_frames``: it ignores ffmpeg's exit status, so a disk that filled up
    while ffmpeg wrote left a truncated mp4 that passed for a finished one (issue #21).
    """
    import imageio_ffmpeg  # only the video paths need the bundled ffmpeg

    height, width = pixels.shape[1:3]
    rate = str(Fraction(fps).limit_denominator())
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", rate, "-i", "-",
        "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "16", "-movflags", "+faststart",
        *output_params, str(temp),
    ]
    # ffmpeg's messages go to a file, not a pipe: a pipe nobody reads could fill and stall the encoder.
    with tempfile.TemporaryFile() as messages:
        encoder = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=messages)
        try:
            for frame in pixels:
                if check_stop is not None:
                    check_stop()
                encoder.stdin.write(memoryview(np.ascontiguousarray(frame)).cast("B"))
            encoder.stdin.close()
        except BrokenPipeError:  # ffmpeg quit early (a full disk); its status and messages say why
            with contextlib.suppress(BrokenPipeError):
                encoder.stdin.close()
        except BaseException:
            encoder.kill()
            encoder.wait()
            with contextlib.suppress(BrokenPipeError):
                encoder.stdin.close()
            raise
        status = encoder.wait()
        if status != 0:
            messages.seek(0)
            problem = messages.read().decode("utf-8", "replace").strip().splitlines()
            detail = problem[-1] if problem else f"ffmpeg ended with status {status}"
            raise MediaError(f"could not write {path} ({detail}); free some disk space or choose a writable "
                             "output folder")


def _check_frames(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[0] < 1:
        raise ValueError(f"frames must be shaped (frames, height, width, 3); got {pixels.shape}")
    return pixels


def write_gif(frames: np.ndarray, path: str | Path, fps: float, check_stop: Callable[[], None] | None = None) -> Path:
    """An endlessly looping GIF; ``check_stop`` is called before each frame is converted (see ``write_mp4``)."""
    pixels = _check_frames(to_uint8(frames))
    images = []
    for frame in pixels:
        if check_stop is not None:
            check_stop()
        images.append(PIL.Image.fromarray(frame))

    def write(temp: Path) -> None:
        images[0].save(
            temp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
        )

    return _write_output(Path(path), write)


def write_png_frames(frames: np.ndarray, folder: str | Path) -> list[Path]:
    """frame_0000.png ... into a new folder (which must not exist yet)."""
    folder = Path(folder)
    if folder.exists():
        raise MediaError(f"{folder} already exists; choose another folder name")
    return [
        _write_output(folder / f"frame_{index:04d}.png",
                      lambda temp, f=frame: PIL.Image.fromarray(f).save(temp, format="PNG"))
        for index, frame in enumerate(to_uint8(frames))
    ]


def write_text(text: str, path: str | Path) -> Path:
    """A new UTF-8 text output (a run record), written whole or not at all and never over another file."""
    return _write_output(Path(path), lambda temp: temp.write_text(text, encoding="utf-8"))


def write_json(data: dict, path: str | Path) -> Path:
    return write_text(json.dumps(data, indent=2), path)


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
