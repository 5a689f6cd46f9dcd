"""The training data of the demo model: endless seeded procedural clip streams and their loaders.

Which clip seeds a phase sees (resumable from a clip count), how still clips are oversampled, and how
a batch of uint8 frames becomes model input: kept apart from the loop so the streams stay reproducible
on their own.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lowvram_studio.demo_training.procedural import MOTION_CLASSES, ClipSpec, MotionClass, make_clip
from lowvram_studio.demo_training.train_config import TrainConfig


def stream_motion(seed: int, still_fraction: float) -> MotionClass | None:
    """The class forced on a stream's clip ``seed`` (None: the seed's own, uniform pick).

    Still clips are oversampled by turning a seeded share of the other clips still, so that a share
    of 0.1 (uniform over the ten classes) leaves every clip as ``make_clip(seed)`` draws it.
    """
    natural = 1 / len(MOTION_CLASSES)
    if still_fraction <= natural:
        return None
    extra = (still_fraction - natural) / (1 - natural)
    return MotionClass.STILL if np.random.default_rng([seed, 7]).random() < extra else None


class ClipStream(IterableDataset):
    """Endless procedural clips; clip ``i`` has seed ``first_seed + i``, split across workers."""

    def __init__(self, first_seed: int, spec: ClipSpec, pool: int | None = None, still_fraction: float = 0.1) -> None:
        self.first_seed = first_seed
        self.spec = spec
        self.pool = pool
        self.still_fraction = still_fraction

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            cv2.setNumThreads(1)  # one clip per worker at a time; OpenCV's own threads only contend
        i = worker
        while True:
            seed = self.first_seed + (i % self.pool if self.pool else i)
            clip = make_clip(seed, self.spec, stream_motion(seed, self.still_fraction))
            yield torch.from_numpy(clip.frames), clip.motion_bucket_id
            i += workers


def training_seed(config: TrainConfig, phase: str, clips_seen: int) -> int:
    """First clip seed of a phase's stream; held-out evaluation seeds start at 10**9."""
    return config.seed * 10**8 + (0 if phase == "vae" else 5 * 10**7) + clips_seen


def make_loader(config: TrainConfig, phase: str, clips_seen: int, batch: int) -> DataLoader:
    spec = ClipSpec(num_frames=config.num_frames, size=config.size)
    dataset = ClipStream(training_seed(config, phase, clips_seen), spec, config.clip_pool, config.still_fraction)
    # Spawned, not forked, workers: forking while the previous phase's loader threads (pin memory) still run left
    # the UNet phase's loader stalled for minutes on the GPU. A stalled worker raises after 2 minutes anyway.
    extra = (
        {"prefetch_factor": 4, "persistent_workers": True, "timeout": 120, "multiprocessing_context": "spawn"}
        if config.workers
        else {}
    )
    return DataLoader(dataset, batch_size=batch, num_workers=config.workers, pin_memory=torch.cuda.is_available(), **extra)


def to_model_range(frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, F, 3, H, W) in [-1, 1], as VideoProcessor.preprocess gives."""
    x = frames.to(device, non_blocking=True).permute(0, 1, 4, 2, 3).float()
    return x / 127.5 - 1.0
