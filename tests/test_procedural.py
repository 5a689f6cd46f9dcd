"""Procedural clips: deterministic, well-formed, and their motion is what their class says."""

import numpy as np
import pytest

from lowvram_studio.demo_training.evaluate import STILL_FLOOR, follows_motion, measure_motion
from lowvram_studio.demo_training.procedural import (
    MOTION_CLASSES,
    ClipSpec,
    MotionClass,
    make_clip,
    motion_bucket_for,
)


def test_same_seed_gives_identical_clip():
    a, b = make_clip(123), make_clip(123)
    assert a.motion == b.motion and a.magnitude == b.magnitude
    np.testing.assert_array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, make_clip(124).frames)


@pytest.mark.parametrize("spec", [ClipSpec(), ClipSpec(num_frames=8, size=64)])
def test_clip_shape_and_dtype(spec):
    clip = make_clip(5, spec)
    assert clip.frames.shape == (spec.num_frames, spec.size, spec.size, 3)
    assert clip.frames.dtype == np.uint8
    assert clip.motion in MOTION_CLASSES


def test_seeds_cover_every_motion_class():
    assert {make_clip(i).motion for i in range(200)} == set(MOTION_CLASSES)


def test_still_clip_has_bucket_zero_and_moving_clip_a_positive_bucket():
    assert make_clip(1, motion=MotionClass.STILL).motion_bucket_id == 0
    moving = make_clip(1, motion=MotionClass.RIGHT)
    assert moving.motion_bucket_id == motion_bucket_for(moving.magnitude) > 0


def _centroid_of_change(frame: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Centroid of the pixels that changed since the first frame (old and new place of a shape)."""
    ys, xs = np.nonzero(np.abs(frame.astype(np.int16) - first.astype(np.int16)).sum(-1) > 30)
    return np.array([xs.mean(), ys.mean()])


def test_moving_shape_centroid_moves_and_still_scene_is_constant():
    clip = make_clip(2, motion=MotionClass.RIGHT)
    early = _centroid_of_change(clip.frames[1], clip.frames[0])
    late = _centroid_of_change(clip.frames[-1], clip.frames[0])
    # The changed region spans start..current position, so its centroid moves at half speed.
    span = clip.magnitude * (len(clip.frames) - 1)
    assert late[0] - early[0] > 0.3 * span
    assert abs(late[1] - early[1]) < 0.1 * span
    still = make_clip(2, motion=MotionClass.STILL).frames
    assert np.array_equal(still[0], still[-1])


@pytest.mark.parametrize("motion", MOTION_CLASSES)
def test_flow_measurement_recognises_ground_truth_class(motion):
    for seed in range(3):
        clip = make_clip(1000 + seed, motion=motion)
        est = measure_motion(clip.frames)
        assert follows_motion(motion, est), (seed, est)
        if motion is MotionClass.STILL:
            assert est.speed < STILL_FLOOR
        else:
            assert est.speed > STILL_FLOOR
