"""Precision policy per GPU, layerwise casting on the demo pipeline, and the NaN/inf guard."""

from __future__ import annotations

import pytest
import torch

from lowvram_studio.engine.components import DENOISER, SVD_COMPONENTS, by_role
from lowvram_studio.engine.precision import (
    GpuInfo,
    NonFiniteError,
    PrecisionError,
    apply_precision,
    check_finite,
    execution_path,
    resolve_component,
)
from lowvram_studio.models.demo import build_demo_pipeline
from lowvram_studio.settings import HalfCompute, Precision, RunSettings
from lowvram_studio.settings_adapter import precision_policy

F16, F32, BF16, F8 = torch.float16, torch.float32, torch.bfloat16, torch.float8_e4m3fn
UNET = by_role(SVD_COMPONENTS, DENOISER)

GPUS = {
    "gtx1060": GpuInfo("NVIDIA GeForce GTX 1060 6GB", (6, 1)),
    "v100": GpuInfo("Tesla V100-SXM2-16GB", (7, 0)),
    "gtx1660": GpuInfo("NVIDIA GeForce GTX 1660 SUPER", (7, 5)),
    "rtx2060": GpuInfo("NVIDIA GeForce RTX 2060", (7, 5)),
    "t4": GpuInfo("Tesla T4", (7, 5)),
    "rtx3060": GpuInfo("NVIDIA GeForce RTX 3060", (8, 6)),
    "rtx4090": GpuInfo("NVIDIA GeForce RTX 4090", (8, 9)),
    "h100": GpuInfo("NVIDIA H100 80GB HBM3", (9, 0)),
}


@pytest.mark.parametrize(
    "gpu, requested, storage, compute",
    [
        (None, Precision.AUTO, F32, F32),
        (None, Precision.FP8, F8, F32),
        ("gtx1060", Precision.AUTO, F16, F32),
        ("gtx1060", Precision.FP8, F8, F32),
        ("v100", Precision.FP16, F16, F32),
        ("gtx1660", Precision.AUTO, F16, F32),
        ("gtx1660", Precision.FP16, F16, F32),
        ("rtx2060", Precision.AUTO, F16, F16),
        ("t4", Precision.FP16, F16, F16),
        ("rtx3060", Precision.BF16, BF16, BF16),
        ("rtx4090", Precision.FP8, F8, F16),
        ("h100", Precision.AUTO, F16, F16),
        ("h100", Precision.FP32, F32, F32),
    ],
)
def test_unet_precision_follows_the_gpu_table(gpu, requested, storage, compute):
    got = resolve_component(requested, UNET, GPUS.get(gpu))
    assert (got.storage, got.compute) == (storage, compute)


@pytest.mark.parametrize(
    "gpu, generation, compute, bf16, native_fp8, compile_ok",
    [
        ("gtx1060", "Pascal", F32, False, False, False),
        ("v100", "Volta", F32, False, False, False),
        ("gtx1660", "Turing GTX 16xx", F32, False, False, True),
        ("rtx2060", "Turing", F16, False, False, True),
        ("rtx3060", "Ampere", F16, True, False, True),
        ("rtx4090", "Ada", F16, True, True, True),
        ("h100", "Hopper", F16, True, True, True),
    ],
)
def test_each_gpu_generation_gets_its_execution_path(gpu, generation, compute, bf16, native_fp8, compile_ok):
    path = execution_path(GPUS[gpu])
    assert (path.generation, path.half_compute, path.bf16, path.native_fp8, path.compile) == (
        generation, compute, bf16, native_fp8, compile_ok)
    assert path.describe().startswith(f"{GPUS[gpu].name} ({generation}): ")
    assert "NaN guard on" in path.describe() and not path.overridden


def test_half_compute_overrides_the_path_and_the_record_says_so():
    settings = RunSettings(unet_dtype="fp16", half_compute="fp16")
    policy = precision_policy(settings, GPUS["gtx1060"])
    assert (policy.denoiser.storage, policy.denoiser.compute) == (F16, F16)
    assert "fp16 compute (set by half_compute)" in policy.path.describe()
    h100 = precision_policy(settings.replace(half_compute=HalfCompute.FP32), GPUS["h100"])
    assert h100.denoiser.describe() == "fp16 storage, fp32 compute"


@pytest.mark.parametrize("gpu", ["gtx1060", "gtx1660", "rtx2060"])
def test_bf16_on_pre_ampere_gpu_is_refused_with_the_fix(gpu):
    with pytest.raises(PrecisionError, match="unet_dtype=bf16 needs an Ampere.*choose fp16 or fp32 for unet_dtype"):
        resolve_component(Precision.BF16, UNET, GPUS[gpu])


@pytest.mark.parametrize("gpu", [None, "gtx1060", "h100"])
def test_vae_and_image_encoder_default_to_fp32(gpu):
    policy = precision_policy(RunSettings(vae_dtype="auto", encoder_dtype="auto"), GPUS.get(gpu))
    assert policy.vae.compute == F32 and policy.encoder.compute == F32
    assert precision_policy(RunSettings(), GPUS.get(gpu)).vae.storage == F32


def test_fp8_storage_casts_layerwise_and_runs():
    pipeline = build_demo_pipeline()
    policy = precision_policy(RunSettings(unet_dtype="fp8"), None)
    apply_precision(pipeline, policy)
    unet = pipeline.unet
    assert unet.conv_in.weight.dtype == F8  # stored in fp8 ...
    assert policy.describe()["unet"] == "fp8 storage, fp32 compute"
    with torch.no_grad():
        out = unet(
            torch.randn(1, 2, 8, 8, 8),
            torch.tensor(0.5),
            encoder_hidden_states=torch.randn(1, 1, 64),
            added_time_ids=torch.tensor([[6.0, 127.0, 0.02]]),
            return_dict=False,
        )[0]
    assert out.dtype == F32 and torch.isfinite(out).all()  # ... computed in fp32
    with pytest.raises(PrecisionError, match="UNet's weights were rounded to fp8 storage, fp32 compute.*reload the model"):
        apply_precision(pipeline, precision_policy(RunSettings(unet_dtype="fp32"), None))


def test_fp16_policy_casts_components_and_keeps_vae_fp32():
    pipeline = build_demo_pipeline()
    apply_precision(pipeline, precision_policy(RunSettings(unet_dtype="fp16"), GPUS["h100"]))
    assert pipeline.unet.dtype == F16 and pipeline.vae.dtype == F32 and pipeline.image_encoder.dtype == F32
    with pytest.raises(PrecisionError, match="rounded to fp16 by an earlier run.*reload the model"):
        apply_precision(pipeline, precision_policy(RunSettings(unet_dtype="fp32"), GPUS["h100"]))


def test_nan_guard_names_component_step_and_setting():
    policy = precision_policy(RunSettings(unet_dtype="fp16"), GPUS["h100"])
    latents = torch.zeros(1, 4, 8, 8)
    check_finite(latents, "unet", policy, "at step 3")
    latents[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError) as caught:
        check_finite(latents, "unet", policy, "at step 3")
    assert str(caught.value) == "the UNet produced NaN at step 3 in fp16; set unet_dtype to bf16 or fp32"
    assert caught.value.setting == "unet_dtype"


def test_inf_guard_on_pascal_suggests_fp32_only():
    policy = precision_policy(RunSettings(unet_dtype="fp16"), GPUS["gtx1060"])
    with pytest.raises(NonFiniteError, match="produced inf at step 1 in fp16 storage, fp32 compute; set unet_dtype to fp32$"):
        check_finite(torch.tensor([1.0, float("inf")]), "unet", policy, "at step 1")


def test_nan_in_fp32_vae_points_at_the_model_not_precision():
    policy = precision_policy(RunSettings(), None)
    with pytest.raises(NonFiniteError, match="the VAE produced NaN in fp32, so precision is not the cause"):
        check_finite(torch.tensor([float("nan")]), "vae", policy)


def test_a_wider_precision_after_a_narrower_run_asks_for_a_reload(test_image):
    """fp32 -> fp16 -> fp32 in place cannot restore the lost bits: the engine refuses instead of computing wrongly."""
    from lowvram_studio.engine.precision import PrecisionError, rounded_components
    from lowvram_studio.settings_adapter import generate
    from lowvram_studio.models.demo import build_demo_pipeline
    from lowvram_studio.settings import RunSettings

    pipeline = build_demo_pipeline()
    tiny = RunSettings(height=64, width=64, num_frames=2, num_inference_steps=1, max_guidance_scale=1.0)
    fp32 = precision_policy(tiny.replace(unet_dtype="fp32"), None)
    generate(pipeline, test_image, tiny.replace(unet_dtype="fp16"))
    assert rounded_components(pipeline, fp32) == ["unet"]
    with pytest.raises(PrecisionError, match="reload the model to change unet_dtype"):
        generate(pipeline, test_image, tiny.replace(unet_dtype="fp32"))
