"""The time estimate for the user's own card before a run, and its calibration from the runs it finished.

engine/speed_model.py knows GPU classes and UNet costs; this module ties it to this machine: the GPU the
run goes to, the calibration file in the user's data folder and the atomic writer (the engine imports
nothing outside engine/). The CLI, the studio and ``jobs.run_job`` all ask here, so the studio's line
before Generate, the CLI's line and the run record agree.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from . import media
from .engine.precision import GpuInfo
from .engine.speed_model import SpeedCalibration, SpeedEstimate, estimate_speed
from .engine.dims import ModelDims
from .plan.memory_model import vae_and_encoder_bytes
from .settings import RunSettings
from .settings_table import names
from .settings_adapter import step_config
from .userdirs import data_dir

logger = logging.getLogger(__name__)

# the settings that change s/step (settings_table: cost "step"): one calibration entry per combination
STEP_SETTINGS = names(cost="step")


def speed_key(model: str, gpu_name: str, settings: RunSettings) -> str:
    """Model, GPU, size and the settings that change s/step (``STEP_SETTINGS``): one calibration entry."""
    values = {name: getattr(getattr(settings, name), "value", getattr(settings, name)) for name in STEP_SETTINGS}
    return (f"{model}|{gpu_name}|{settings.width}x{settings.height}x{settings.num_frames}|"
            + json.dumps(values, sort_keys=True))


def estimate_for_card(unet_config: dict[str, Any] | None, dims: ModelDims, settings: RunSettings,
                      gpu: GpuInfo | None) -> SpeedEstimate | None:
    """s/step and the clip's denoising time on ``gpu``, calibrated by this card's earlier runs (None on the CPU,
    where the GPU-class table has nothing to say, and without a UNet config: the speed model counts UNet layers,
    a Wan transformer has none). ``dims.name`` keys the calibration."""
    if gpu is None or unet_config is None:
        return None
    return estimate_speed(unet_config, step_config(settings, gpu), settings.num_inference_steps, gpu.name,
                          key=speed_key(dims.name, gpu.name, settings),
                          other_component_bytes=vae_and_encoder_bytes(dims, settings),
                          calibration=SpeedCalibration.load(data_dir()))


def remember_speed(dims: ModelDims, settings: RunSettings, gpu: GpuInfo | None, seconds_per_step: float | None,
                   estimate: SpeedEstimate | None) -> None:
    """Keep a finished run's measured s/step so the next estimate for this card is calibrated. A calibration
    file that cannot be written costs only future accuracy: logged, never a failed run."""
    if gpu is None or estimate is None or not seconds_per_step:
        return
    try:
        SpeedCalibration.load(data_dir()).record(speed_key(dims.name, gpu.name, settings), gpu.name,
                                                 seconds_per_step, estimate.predicted_s_per_step,
                                                 media.write_atomically)
    except (OSError, media.MediaError) as exc:
        logger.warning("could not keep this run's speed for the next estimate: %s", exc)


def estimate_record(estimate: SpeedEstimate | None, measured_s_per_step: float | None) -> dict[str, Any] | None:
    """The estimate as the run record keeps it, beside the measured s/step it can be judged by."""
    if estimate is None:
        return None
    out = {"text": estimate.text, "seconds_per_step": round(estimate.seconds_per_step, 3),
           "predicted_s_per_step": round(estimate.predicted_s_per_step, 3), "basis": estimate.basis,
           "gpu_class": estimate.gpu_class, "known_gpu": estimate.known_gpu}
    if measured_s_per_step:
        out["measured_over_estimate"] = round(measured_s_per_step / estimate.seconds_per_step, 3)
    return out
