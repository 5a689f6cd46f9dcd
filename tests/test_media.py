"""Input images of every odd-but-valid kind work, every broken kind fails clearly; videos read back."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from lowvram_studio.media import (
    MediaError,
    fit_image,
    load_image,
    read_video,
    to_uint8,
    unique_path,
    write_atomically,
    write_gif,
    write_mp4,
    write_png_frames,
)


def _save(image: PIL.Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _gradient(size=(40, 30)) -> np.ndarray:
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 90)], -1).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_common_formats_load_as_rgb(tmp_path, fmt):
    path = _save(PIL.Image.fromarray(_gradient()), tmp_path / f"in.{fmt.lower()}", format=fmt)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    image = load_image(_save(PIL.Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert image.getpixel((5, 5)) == (255, 255, 255)


def test_grayscale_palette_and_16bit_are_converted(tmp_path):
    grey = load_image(_save(PIL.Image.fromarray(_gradient()[..., 0]), tmp_path / "g.png"))
    assert grey.mode == "RGB"
    palette = load_image(_save(PIL.Image.fromarray(_gradient()).convert("P"), tmp_path / "p.png"))
    assert palette.mode == "RGB"
    deep = np.full((8, 8), 32768, np.uint16)
    sixteen = load_image(_save(PIL.Image.fromarray(deep), tmp_path / "d.png"))
    assert sixteen.mode == "RGB" and abs(sixteen.getpixel((1, 1))[0] - 128) <= 1


def test_exif_rotation_is_applied(tmp_path):
    image = PIL.Image.fromarray(_gradient((40, 30)))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(image, tmp_path / "r.jpg", format="JPEG", exif=exif.tobytes())
    assert load_image(path).size == (30, 40)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_text("hello, not an image"), "is not an image"),
        (lambda p: p.write_bytes(_png_bytes()[:60]), "damaged or truncated"),
    ],
)
def test_broken_files_are_rejected(tmp_path, make, message):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(MediaError, match=message):
        load_image(path)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(MediaError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_decompression_bomb_is_rejected(tmp_path):
    # A valid PNG header claiming 20000 x 20000 pixels: refused before decoding.
    bomb = PIL.Image.new("1", (20000, 20000))
    path = _save(bomb, tmp_path / "bomb.png")
    with pytest.raises(MediaError, match="megapixels"):
        load_image(path)


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(_gradient((64, 64))).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(30, 200), (1000, 30), (64, 64), (7, 5)])
def test_fit_image_covers_and_centre_crops(size):
    image = PIL.Image.fromarray(_gradient(size))
    fitted = fit_image(image, 128, 64)
    assert fitted.size == (128, 64)


def test_mp4_reads_back_with_frames_size_and_fps(tmp_path):
    frames = np.stack([np.full((64, 96, 3), i * 20, np.uint8) for i in range(9)])
    write_mp4(frames, tmp_path / "v.mp4", fps=7)
    decoded, fps = read_video(tmp_path / "v.mp4")
    assert decoded.shape == (9, 64, 96, 3) and fps == 7
    assert np.abs(decoded.astype(int) - frames).mean() < 3


def test_outputs_never_overwrite(tmp_path):
    frames = np.zeros((2, 64, 64, 3), np.float32)
    write_gif(frames, tmp_path / "v.gif", fps=7)
    with pytest.raises(MediaError, match="already exists"):
        write_gif(frames, tmp_path / "v.gif", fps=7)
    assert unique_path(tmp_path, "v", ".gif").name == "v-2.gif"


def test_bad_frames_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="frames must be shaped"):
        write_mp4(np.zeros((2, 64, 64), np.float32), tmp_path / "v.mp4", fps=7)
    assert list(tmp_path.iterdir()) == []


def test_a_write_failing_halfway_leaves_no_file(tmp_path):
    def half_then_fail(temp: Path) -> None:
        temp.write_bytes(b"half a video")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(tmp_path / "v.mp4", half_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_png_frames_are_written(tmp_path):
    paths = write_png_frames(np.random.rand(3, 16, 16, 3).astype(np.float32), tmp_path / "frames")
    assert [p.name for p in paths] == ["frame_0000.png", "frame_0001.png", "frame_0002.png"]
    assert to_uint8(np.array([[[[1.0, 0.0, 0.5]]]]))[0, 0, 0].tolist() == [255, 0, 128]
