"""The configuration of a demo-model training run: every knob, the fine-tune recipe and the smoke sizes.

One dataclass that the trainer, the data streams, the objective and the benchmarks all read, apart
from the loop that uses it, so that a checkpoint's stored config and a CLI override mean the same thing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lowvram_studio.demo_training.procedural import MOTION_CLASSES


@dataclass
class TrainConfig:
    """Every knob of a training run; stored in the checkpoint and the exported log."""

    seed: int = 0
    num_frames: int = 14
    size: int = 128
    vae_minutes: float = 8.2
    unet_minutes: float = 7.0  # --final replaces it so that the phase ends at the invocation's deadline
    vae_steps: int | None = None  # a step budget replaces the minute budget (reproducible runs, smoke)
    unet_steps: int | None = None
    # Clips of num_frames frames per VAE step. CPU A/B at 64 px, 4 frames, equal frames seen: 4 clips x 150
    # steps 13.83 dB, 1 clip x 600 steps 13.86 dB held-out; the sample count matters, not the batch, so
    # this only trades the GPU's per-frame efficiency (better at 16) against step count (better at 4).
    vae_batch: int = 8
    unet_batch: int = 64
    vae_lr: float = 4e-4
    unet_lr: float = 4e-4
    warmup_steps: int = 200
    kl_weight: float = 1e-4
    edge_weight: float = 0.0  # weight of the image-gradient L1 term of the VAE loss
    temporal_weight: float = 1.0  # weight of the frame-difference L1 term of the VAE loss (flicker)
    bank_size: int = 16384  # clips held in the latent bank (~110 KB each on the device)
    bank_initial: int = 1024  # clips encoded before the first UNet step
    bank_refresh: int = 8  # fresh clips encoded into the bank per UNet step
    cuda_graph: bool = True  # replay each UNet step from a CUDA graph (graphed_step.py); CUDA only
    motion_weight: float = 3.0  # extra loss weight where the clip moves (objective.motion_weights)
    motion_threshold: float = 0.25  # scaled-latent change that counts as fully moving
    holdout_clips: int = 8  # VAE round trip measured on these held-out clips
    holdout_every: int = 1000  # VAE steps between held-out measurements
    min_phase_minutes: float = 1.5  # a phase does not start in an invocation with less time left
    p_mean: float = 0.7  # SVD's log-normal training sigmas
    p_std: float = 1.6
    high_sigma_fraction: float = 0.1  # extra samples log-uniform up to sigma_max, where inference starts
    sigma_min: float = 0.002
    sigma_max: float = 700.0
    cond_dropout: float = 0.1
    noise_aug_mean: float = 0.02
    workers: int = field(default_factory=lambda: max(0, min(14, (os.cpu_count() or 2) - 2)))
    save_every_minutes: float = 3.0
    log_every: int = 25  # steps averaged into one training-log entry
    clip_pool: int | None = None  # cycle through this many clips (smoke: see the loss fall in a few steps)
    still_fraction: float = 1 / len(MOTION_CLASSES)  # share of still clips in the training streams (uniform: 0.1)
    init_from: str | None = None  # fine-tune: exported weights folder the models start from (decoder-only VAE phase)


# Fine-tune recipe, applied by --init-from on top of TrainConfig's defaults (not to --smoke's sizes).
FINETUNE_DEFAULTS: dict = {
    "seed": 1,  # fresh clips: seed 0's streams are the ones the first two releases were trained on
    "vae_minutes": 2.0,  # 0 skips the VAE phase: the UNet trains on the --init-from VAE as it is
    "unet_minutes": 5.0,
    "vae_lr": 2e-4,  # the decoder is trained: no need for the 4e-4 of a scratch run
    # Replayed from a CUDA graph a step of 64 clips takes ~0.10 s (eager: 0.25 s at 16, 64 or 128 clips,
    # bench/results/demo_train_step_20261126.md), so the batch no longer costs steps.
    "unet_batch": 64,
    "unet_lr": 2e-4,
    "warmup_steps": 100,
    "still_fraction": 0.2,  # the shipped model drifts on still scenes: twice their natural share
}


def smoke_config() -> TrainConfig:
    """A few steps at tiny size: proves the loop on a CPU in well under a minute."""
    return TrainConfig(
        num_frames=2, size=64, vae_steps=5, unet_steps=3, vae_batch=1, unet_batch=2,
        vae_lr=1e-3, unet_lr=1e-3, warmup_steps=1, workers=0, log_every=1, clip_pool=1,
        bank_size=4, bank_initial=2, bank_refresh=1, holdout_clips=1, holdout_every=4, min_phase_minutes=0.0,
    )
