"""System RAM planned before a run (plan/ram.py): the weights a run keeps on the host against the machine's RAM;
an impossible run is refused with what to change, a tight one warned about, and the record carries the plan."""

from __future__ import annotations

import json
from pathlib import Path


from lowvram_studio.cli import main
from lowvram_studio.engine.dims import ModelDims
from lowvram_studio.engine.options import OffloadMode
from lowvram_studio.engine.precision import GpuInfo, PrecisionPolicy, PrecisionRequest
from lowvram_studio.engine.wan import WAN_COMPONENTS
from lowvram_studio.plan.ram import GIB, MachineRam, plan_ram

ROOT = Path(__file__).resolve().parents[1]
# Wan2.2 TI2V-5B: transformer 5.0 B, VAE 0.7 B, UMT5-XXL 5.68 B parameters
TI2V_5B = ModelDims("wan2.2-ti2v-5b", unet_params=5_000_000_000, vae_params=700_000_000,
                    encoder_params=5_680_000_000, unet_stream_params=400_000_000, native_frames=31, latent_scale=16)
LAPTOP = MachineRam(total=16 * GIB, available=12 * GIB, swap=4 * GIB)
DESKTOP = MachineRam(total=32 * GIB, available=20 * GIB, swap=0)
RTX_3060 = GpuInfo("NVIDIA GeForce RTX 3060", (8, 6))


def policy(gpu, **request) -> PrecisionPolicy:
    return PrecisionPolicy.resolve(PrecisionRequest(**request), gpu, WAN_COMPONENTS)


def test_a_cpu_run_in_fp32_that_cannot_fit_ram_and_swap_is_refused_with_what_to_change():
    plan = plan_ram(TI2V_5B, policy(None, denoiser="fp32", encoder="fp32"), OffloadMode.NONE, False, LAPTOP)
    assert plan.needed == (5_000_000_000 + 700_000_000 + 5_680_000_000) * 4
    message = plan.refusal()
    assert "42.4 GiB of weights in RAM (the run is on the CPU)" in message and "16.0 GiB of RAM" in message
    assert "fp16, bf16 or fp8" in message


def test_streaming_keeps_the_weights_on_the_host_and_warns_when_free_ram_is_short():
    bf16 = policy(RTX_3060, denoiser="bf16", encoder="auto")  # bf16 transformer and encoder, fp32 VAE
    streamed = plan_ram(TI2V_5B, bf16, OffloadMode.STREAM, True, DESKTOP)
    assert streamed.refusal() is None
    assert "22.5 GiB of weights in RAM (offload stream)" in streamed.warning()
    assert "20.0 GiB are free now" in streamed.warning()
    assert "22.5 GiB" in plan_ram(TI2V_5B, bf16, OffloadMode.STREAM, True, LAPTOP).refusal()  # 16 + 4 GiB swap
    on_card = plan_ram(TI2V_5B, bf16, OffloadMode.NONE, True, LAPTOP)
    assert on_card.needed == 0 and on_card.refusal() is None and on_card.warning() is None


def test_the_record_carries_the_ram_plan(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    code = main(["generate", "--image", str(ROOT / "assets" / "ball_and_box.png"), "--out", str(out),
                 "--frames", "4", "--steps", "2", "--width", "64", "--height", "64", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    ram_plan = json.loads(out.with_suffix(".json").read_text())["info"]["ram_plan"]
    assert ram_plan["needed_mib"] == sum(ram_plan["weights_on_host_mib"].values()) + ram_plan["decoded_clip_mib"] > 0
    assert ram_plan["machine_total_mib"] > 0 and ram_plan["warning"] is None




def test_the_decoded_clip_counts_too():
    """Wan's decoded frames come to the host as they are made and are concatenated there: 1280x704x121 in float32
    is 1.2 GiB, 2.4 GiB at the concatenation's peak, on top of the weights a streamed run keeps."""
    from lowvram_studio.plan.ram import decoded_clip_bytes

    bf16 = policy(RTX_3060, denoiser="bf16", encoder="auto")
    clip = decoded_clip_bytes(121, 704, 1280)
    assert clip == 2 * 121 * 704 * 1280 * 3 * 4
    weights_only = plan_ram(TI2V_5B, bf16, OffloadMode.STREAM, True, DESKTOP)
    with_clip = plan_ram(TI2V_5B, bf16, OffloadMode.STREAM, True, DESKTOP, clip)
    assert with_clip.needed == weights_only.needed + clip
    assert "22.5 GiB of weights in RAM (offload stream) and 2.4 GiB of decoded frames" in with_clip.warning()
    assert with_clip.to_dict()["decoded_clip_mib"] == round(clip / 2**20)
