"""Does the demo model really move? Quality of generated clips on held-out procedural inputs.

For each held-out clip the studio's sampler (``engine.sampler.generate``, fp32, the pipeline's
defaults otherwise) gets the clip's first frame and its motion_bucket_id; we measure
(a) PSNR of the first generated frame against that input image, and (b) whether the generated motion
follows the clip's motion class, read from OpenCV's Farneback optical flow: mean flow direction for
moves and pans, the sign of the radial flow about the frame centre for zooms, the sign of the
tangential flow about the moving region for rotation, and the mean speed for still scenes.
The same measurement run on the ground-truth clips must classify them all correctly (tests check it).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from lowvram_studio.demo_training.procedural import (
    MOTION_CLASSES,
    REFERENCE_SIZE,
    TRANSLATION_DIRECTIONS,
    ClipSpec,
    MotionClass,
    make_clip,
)
from lowvram_studio.settings_adapter import generate
from lowvram_studio.settings import DeviceChoice, Precision, RunSettings

logger = logging.getLogger(__name__)

HELD_OUT_FIRST_SEED = 10**9  # training streams use seeds below this
STILL_FLOOR = 0.3  # px/frame at 128 px: a clip whose peak flow speed stays below this is still
MOVING_PIXEL = 0.3  # px/frame at 128 px: a pixel faster than this is part of the motion


@dataclass
class MotionEstimate:
    """Optical-flow summary of a clip, in pixels per frame at 128 px."""

    speed: float  # peak speed: 99th percentile of |flow| (a small shape is ~2 % of the frame)
    translation: tuple[float, float]  # mean flow (dx, dy) over moving pixels
    radial: float  # mean outward flow about the frame centre, over moving pixels
    tangential: float  # mean clockwise flow about the moving region's centroid
    moving_fraction: float


def _gray(frame: np.ndarray) -> np.ndarray:
    if frame.dtype != np.uint8:
        frame = (np.clip(frame, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def measure_motion(frames: np.ndarray) -> MotionEstimate:
    """Summarise the motion of (F, H, W, 3) frames (uint8, or float in [0, 1])."""
    h, w = frames.shape[1:3]
    unit = REFERENCE_SIZE / w
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    grays = [_gray(f) for f in frames]
    speed = radial = tangential = moving = 0.0
    translation = np.zeros(2)
    pairs = len(grays) - 1
    for a, b in zip(grays[:-1], grays[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0) * unit
        magnitude = np.linalg.norm(flow, axis=2)
        mask = magnitude > MOVING_PIXEL
        speed += float(np.percentile(magnitude, 99)) / pairs
        moving += mask.mean() / pairs
        if mask.sum() < 4:
            continue
        f = flow[mask]
        translation += f.mean(axis=0) / pairs
        px, py = xs[mask], ys[mask]
        rx, ry = px - w / 2, py - h / 2
        radial += float(np.mean((rx * f[:, 0] + ry * f[:, 1]) / (np.hypot(rx, ry) + 1e-3))) / pairs
        weights = magnitude[mask]
        cx, cy = np.average(px, weights=weights), np.average(py, weights=weights)
        tx, ty = px - cx, py - cy
        # y points down, so a positive cross product is clockwise on screen.
        tangential += float(np.mean((tx * f[:, 1] - ty * f[:, 0]) / (np.hypot(tx, ty) + 1e-3))) / pairs
    return MotionEstimate(float(speed), (float(translation[0]), float(translation[1])), float(radial), float(tangential), float(moving))


def follows_motion(motion: MotionClass, est: MotionEstimate) -> bool:
    """True when the measured motion matches the class (direction within 45 degrees, right sign)."""
    if motion is MotionClass.STILL:
        return est.speed < STILL_FLOOR
    if est.speed < STILL_FLOOR:
        return False
    if motion in TRANSLATION_DIRECTIONS:
        dx, dy = TRANSLATION_DIRECTIONS[motion]
        along = est.translation[0] * dx + est.translation[1] * dy
        across = abs(est.translation[0] * dy - est.translation[1] * dx)
        return along > across and along > MOVING_PIXEL / 2
    if motion is MotionClass.ROTATE:
        return est.tangential > 0.1 and est.tangential > abs(est.radial)
    sign = 1.0 if motion is MotionClass.ZOOM_IN else -1.0
    return sign * est.radial > 0.1


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two float images in [0, 1]."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def held_out_clips(count: int, spec: ClipSpec) -> list:
    """Clips with seeds no training stream uses, classes in turn so each is equally represented."""
    return [make_clip(HELD_OUT_FIRST_SEED + i, spec, MOTION_CLASSES[i % len(MOTION_CLASSES)]) for i in range(count)]


def evaluate_pipeline(
    pipeline, count: int, spec: ClipSpec, device: torch.device, steps: int = 20, gallery: Path | None = None
) -> dict:
    """Generate from held-out first frames and score PSNR and motion per clip."""
    rows = []
    cells = {}
    for clip in held_out_clips(count, spec):
        settings = RunSettings(
            height=spec.size, width=spec.size, num_frames=spec.num_frames, num_inference_steps=steps,
            seed=clip.seed % 2**31, motion_bucket_id=clip.motion_bucket_id, device=DeviceChoice(device.type),
            unet_dtype=Precision.FP32,
        )
        start = time.perf_counter()
        frames = generate(pipeline, Image.fromarray(clip.frames[0]), settings).frames
        seconds = time.perf_counter() - start
        est = measure_motion(frames)
        truth = measure_motion(clip.frames)
        rows.append({
            "seed": clip.seed, "motion": clip.motion.value, "motion_bucket_id": clip.motion_bucket_id,
            "magnitude": round(clip.magnitude, 3), "first_frame_psnr_db": round(psnr(frames[0], clip.frames[0] / 255.0), 2),
            "follows_motion": follows_motion(clip.motion, est), "generated": asdict(est), "ground_truth": asdict(truth),
            "seconds": round(seconds, 2),
        })
        cells.setdefault(clip.motion, (clip.frames, frames))
    summary = summarise(rows)
    if gallery is not None:
        write_gallery(cells, gallery)
    return {"summary": summary, "rows": rows}


def summarise(rows: list[dict]) -> dict:
    moving = [r for r in rows if r["motion"] != MotionClass.STILL.value]
    still = [r for r in rows if r["motion"] == MotionClass.STILL.value]
    per_class = {
        m.value: round(float(np.mean([r["follows_motion"] for r in rows if r["motion"] == m.value])), 3)
        for m in MOTION_CLASSES if any(r["motion"] == m.value for r in rows)
    }
    return {
        "clips": len(rows),
        "first_frame_psnr_db_mean": round(float(np.mean([r["first_frame_psnr_db"] for r in rows])), 2),
        "first_frame_psnr_db_min": round(float(np.min([r["first_frame_psnr_db"] for r in rows])), 2),
        "motion_follows_fraction": round(float(np.mean([r["follows_motion"] for r in moving])), 3) if moving else None,
        "still_stays_still_fraction": round(float(np.mean([r["follows_motion"] for r in still])), 3) if still else None,
        "still_speed_mean": round(float(np.mean([r["generated"]["speed"] for r in still])), 3) if still else None,
        "per_class": per_class,
    }


def write_gallery(cells: dict, path: Path) -> None:
    """One GIF: per class, the ground-truth clip above the generated one, classes side by side."""
    import imageio.v3 as iio

    columns = []
    for motion in MOTION_CLASSES:
        if motion in cells:
            truth, generated = cells[motion]
            gen = (np.clip(generated, 0, 1) * 255 + 0.5).astype(np.uint8)
            columns.append(np.concatenate([truth, gen], axis=1))
    frames = np.concatenate(columns, axis=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, frames, duration=1000 / 7, loop=0)


def evaluate_folder(weights: Path | None, out: Path, num_clips: int, device: torch.device, smoke: bool = False) -> dict:
    """Evaluate the demo pipeline built from ``weights``; writes ``out`` (JSON) and a gallery GIF beside it."""
    from lowvram_studio.models.demo import build_demo_pipeline
    from lowvram_studio.sysinfo import collect_env

    pipeline = build_demo_pipeline(weights=weights)
    spec = ClipSpec(num_frames=4, size=64) if smoke else ClipSpec()
    steps = 2 if smoke else 20
    report = evaluate_pipeline(pipeline, num_clips, spec, device, steps=steps, gallery=out.with_suffix(".gif"))
    report["weights"] = str(weights)
    report["steps"] = steps
    report["env"] = collect_env()  # GPU, driver, torch, diffusers: every committed result carries them
    report["command"] = " ".join(["python", *sys.argv])  # evaluate.py's own main or train.py's --evaluate
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    logger.info("evaluation written to %s: %s", out, report["summary"])
    return report


def main(argv: list[str] | None = None) -> int:
    """Re-run the evaluation (JSON + gallery GIF) on exported weights, e.g. after they came back from the GPU."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lowvram_studio.demo_training.evaluate", description=main.__doc__)
    parser.add_argument("--weights", type=Path, default=None, help="exported weights folder (default: assets/demo-model)")
    parser.add_argument("--out", type=Path, required=True, help="quality JSON; the gallery GIF goes beside it")
    parser.add_argument("--clips", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="4 frames at 64x64, 2 steps (CPU test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    evaluate_folder(args.weights, args.out, num_clips=args.clips, device=torch.device(args.device), smoke=args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
