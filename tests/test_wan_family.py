"""Wan 2.x behind the model-family interface: the engine's own loop (engine.sampler.sample) on a toy Wan2.2
TI2V pipeline (the real diffusers classes, random weights) gives the diffusers pipeline's frames, and the
engine's techniques run on it."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from lowvram_studio.engine.config import EngineConfig
from lowvram_studio.engine.options import DeviceChoice, OffloadMode
from lowvram_studio.engine.precision import PrecisionRequest
from lowvram_studio.engine.pruning_config import PruningConfig
from lowvram_studio.engine.sampler import sample
from lowvram_studio.engine.vae import DecodeConfig
from lowvram_studio.engine.wan import WanFamily, WanRequest
from lowvram_studio.engine.windows import WindowConfig
from lowvram_studio.models.wan_toy import build_toy_wan_pipeline

SIZE, FRAMES, STEPS = 32, 9, 3
PROMPT, NEGATIVE = "a red ball moves left", "still scene"
PLAIN = EngineConfig(device=DeviceChoice.CPU, precision=PrecisionRequest(denoiser="fp32"), preview_every=0)


@pytest.fixture(scope="module")
def pipeline():
    return build_toy_wan_pipeline()


@pytest.fixture(scope="module")
def image() -> PIL.Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    return PIL.Image.fromarray((np.stack([x, y, 1 - x], axis=-1) * 255).astype(np.uint8))


def request_for(image: PIL.Image.Image, **changes) -> WanRequest:
    fields = dict(width=SIZE, height=SIZE, num_frames=FRAMES, num_inference_steps=STEPS, seed=0, image=image,
                  prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=6.0, max_sequence_length=16)
    return WanRequest(**{**fields, **changes})


def ours(pipeline, image, config: EngineConfig = PLAIN, **changes) -> np.ndarray:
    return sample(WanFamily(pipeline), request_for(image, **changes), config).frames


def test_the_engine_loop_gives_the_diffusers_wan_pipelines_frames(pipeline, image):
    theirs = pipeline(image=image, prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                      num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=6.0, max_sequence_length=16,
                      generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    mine = ours(pipeline, image, PLAIN.replace(cfg_split=True))  # the pipeline's own order: one call per branch
    assert mine.shape == (FRAMES, SIZE, SIZE, 3)
    assert np.abs(mine - np.asarray(theirs, dtype=np.float32)).max() <= 1e-6


def test_batched_guidance_and_streamed_weights_are_lossless(pipeline, image):
    reference = ours(pipeline, image, PLAIN.replace(cfg_split=True))
    batched = ours(pipeline, image)
    streamed = ours(pipeline, image, PLAIN.replace(offload=OffloadMode.STREAM))
    assert np.abs(batched - reference).max() <= 1e-5
    assert np.abs(streamed - batched).max() <= 1e-6


def test_tiled_decode_and_latent_windows_run_and_change_little(pipeline, image):
    reference = ours(pipeline, image)
    tiled = ours(pipeline, image, PLAIN.replace(decode=DecodeConfig(tile=16)))
    windowed = ours(pipeline, image, PLAIN.replace(windows=WindowConfig(size=2, overlap=1)))
    for frames in (tiled, windowed):
        assert frames.shape == reference.shape and np.isfinite(frames).all()
    assert not np.array_equal(windowed, reference)  # windows are lossy by design; they ran


def test_step_reuse_is_diffusers_first_block_cache_with_one_state_per_branch(pipeline, image):
    from diffusers.hooks import FirstBlockCacheConfig

    threshold = 0.5  # the toy's first-block residual changes by less than this after the first steps
    pipeline.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:  # diffusers' own pipeline with its own hook: "cond" and "uncond" contexts, one call per branch
        theirs = pipeline(image=image, prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                          num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=6.0, max_sequence_length=16,
                          generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    finally:
        pipeline.transformer.disable_cache()
    result = sample(WanFamily(pipeline), request_for(image),
                    PLAIN.replace(cfg_split=True, reuse=PruningConfig(threshold=threshold)))
    assert np.abs(result.frames - np.asarray(theirs, dtype=np.float32)).max() <= 1e-6
    summary = result.info["pruning"]
    assert summary["reused_steps"] >= 1 and 0 < summary["pruned_fraction"] < 1 and summary["speedup_estimate"] > 1
    assert len(summary["map"][0]) == STEPS and summary["map"][0][0] == 0  # the first step always computes
    assert not pipeline.transformer.is_cache_enabled  # the hooks left with the run
    assert not any(block._forward_pre_hooks for block in pipeline.transformer.modules())
    assert np.array_equal(ours(pipeline, image), ours(pipeline, image))  # and no state stays behind
    batched = sample(WanFamily(pipeline), request_for(image), PLAIN.replace(reuse=PruningConfig(threshold=threshold)))
    assert np.isfinite(batched.frames).all() and batched.info["pruning"]["reused_steps"] >= 1


def test_an_out_of_memory_re_plan_on_wan_takes_only_moves_its_model_can_take(pipeline, image):
    from lowvram_studio.plan.planner import Planner
    from lowvram_studio.plan.replan import decode_retry, run_with_replan
    from lowvram_studio.settings import RunSettings
    from lowvram_studio.settings_adapter import generate

    family = WanFamily(pipeline)
    planner = Planner(family.dims(), device_type="cpu")  # its family's moves
    failures = {"denoise": 3, "decode": 1}  # three transformer calls run out of memory, then one decode (192 px: a
    # 128 px tile is a move)

    def fail(what):
        def hook(module, args):
            if failures[what]:
                failures[what] -= 1
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({what}, raised by the test)")
        return hook

    handles = [pipeline.transformer.register_forward_pre_hook(fail("denoise")),
               pipeline.vae.decoder.register_forward_pre_hook(fail("decode"))]
    settings = RunSettings(height=192, width=192, num_frames=FRAMES, num_inference_steps=2, device="cpu",
                           unet_dtype="fp32", prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=6.0)
    try:
        result = run_with_replan(
            lambda current, on_event: generate(pipeline, image, current, on_event=on_event,
                                               decode_retry=decode_retry(planner)), settings, planner)
    finally:
        for handle in handles:
            handle.remove()
    changed = {name for retry in result.info["oom_retries"] for name in retry["changed_settings"]}
    assert result.frames.shape == (FRAMES, 192, 192, 3) and len(result.info["oom_retries"]) == 4
    assert changed and not changed & {"spatial_chunk", "temporal_chunk", "decode_frames"}  # SVD's UNet / decoder


def test_frame_reuse_is_refused_for_wan_with_the_fix(pipeline, image):
    from lowvram_studio.engine.options import PruneMode

    with pytest.raises(ValueError, match="every token attends across frames.*set prune_mode to steps"):
        ours(pipeline, image, PLAIN.replace(reuse=PruningConfig(threshold=0.05, mode=PruneMode.FRAMES)))


def test_half_precision_keeps_what_the_model_class_keeps_in_fp32():
    from lowvram_studio.engine.precision import GpuInfo, PrecisionPolicy, apply_precision
    from lowvram_studio.engine.wan import WAN_COMPONENTS

    pipeline = build_toy_wan_pipeline()
    h100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
    apply_precision(pipeline, PrecisionPolicy.resolve(PrecisionRequest(denoiser="bf16", encoder="bf16"), h100,
                                                      WAN_COMPONENTS))
    transformer = pipeline.transformer
    assert transformer.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert transformer.scale_shift_table.dtype == torch.float32
    assert transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    t5_ff_out = pipeline.text_encoder.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert t5_ff_out.dtype == torch.float32 and pipeline.text_encoder.shared.weight.dtype == torch.bfloat16


def test_feed_forward_chunks_cut_the_transformers_tokens_losslessly(pipeline, image):
    from lowvram_studio.engine.chunking import FEED_FORWARD_HOOK, ChunkingConfig, chunk_hook_counts

    big = image.resize((64, 64))  # 12 tokens a branch: 24 rows with batched guidance
    reference = ours(pipeline, big, width=64, height=64)
    seen: list[int] = []
    first_projection = pipeline.transformer.blocks[0].ffn.net[0]
    handle = first_projection.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[:-1].numel()))
    chunked = sample(WanFamily(pipeline), request_for(big, width=64, height=64),
                     PLAIN.replace(chunking=ChunkingConfig(ff_chunk=5)))
    handle.remove()
    assert chunked.info["chunk_hooks"][FEED_FORWARD_HOOK] == len(pipeline.transformer.blocks)
    assert seen[:5] == [5, 5, 5, 5, 4]  # each step's 24 rows in chunks of 5
    assert np.abs(chunked.frames - reference).max() <= 1e-5
    ours(pipeline, image)  # the plain config again takes the hooks off
    assert chunk_hook_counts(pipeline.transformer)[FEED_FORWARD_HOOK] == 0


def test_svds_frame_and_position_chunks_are_refused_for_wan_rather_than_doing_nothing(pipeline, image):
    from lowvram_studio.engine.chunking import ChunkingConfig

    with pytest.raises(ValueError, match="spatial_chunk has no layers to cut in WanTransformer3DModel; set it to 0"):
        ours(pipeline, image, PLAIN.replace(chunking=ChunkingConfig(spatial_chunk=2)))
    assert ours(pipeline, image).shape == (FRAMES, SIZE, SIZE, 3)  # the pipeline is left usable


def test_auto_keeps_the_text_encoder_in_bf16_where_the_device_has_it_and_fp32_elsewhere():
    from lowvram_studio.engine.precision import GpuInfo, PrecisionPolicy
    from lowvram_studio.engine.svd import SVD_COMPONENTS
    from lowvram_studio.engine.wan import WAN_COMPONENTS

    auto = PrecisionRequest(encoder="auto")
    for gpu, expected in ((None, torch.bfloat16), (GpuInfo("NVIDIA GeForce RTX 3060", (8, 6)), torch.bfloat16),
                          (GpuInfo("NVIDIA GeForce GTX 1060 6GB", (6, 1)), torch.float32)):
        assert PrecisionPolicy.resolve(auto, gpu, WAN_COMPONENTS).encoder.storage == expected
    assert PrecisionPolicy.resolve(auto, None, SVD_COMPONENTS).encoder.storage == torch.float32  # CLIP: fp32


def test_an_offloaded_wan_vae_moves_its_encoder_and_decoder_halves_apart_and_frames_stay_equal(pipeline, image):
    """Model offload and streaming hook Wan's VAE encoder and decoder separately (the encode phase holds only the
    150 M-parameter encoder of TI2V-5B's 705 M), and the memory model counts just that half in each phase."""
    from lowvram_studio.engine.placement import PlacementConfig, apply_placement, clear_placement, placement_hooks
    from lowvram_studio.engine.wan import WAN_COMPONENTS
    from lowvram_studio.models.wan_configs import ti2v_5b_dims
    from lowvram_studio.plan.memory_model import resident_weights_mib
    from lowvram_studio.engine.events import Phase
    from lowvram_studio.settings import RunSettings

    reference = ours(pipeline, image)
    for mode in (OffloadMode.MODEL, OffloadMode.STREAM):
        assert np.abs(ours(pipeline, image, PLAIN.replace(offload=mode)) - reference).max() <= 1e-6, mode
    apply_placement(pipeline, PlacementConfig(OffloadMode.MODEL, "cpu", WAN_COMPONENTS))
    try:
        assert set(pipeline._lowvram_offload_hooks) == {"transformer", "text_encoder", "vae.encoder", "vae.decoder"}
        assert not hasattr(pipeline.vae, "_hf_hook") and hasattr(pipeline.vae.decoder, "_hf_hook")
        assert placement_hooks(pipeline)["vae"] == ["CpuOffload"]
    finally:
        clear_placement(pipeline)
    assert not any(hasattr(module, "_hf_hook") for module in pipeline.vae.modules())

    dims = ti2v_5b_dims()
    vae_mib = dims.vae_params * 4 / 2**20  # fp32
    streamed = RunSettings(offload="stream", device="cuda")
    encode, decode = (resident_weights_mib(dims, streamed, phase) for phase in (Phase.ENCODE, Phase.DECODE))
    assert dims.vae_encode_params / dims.vae_params < 0.25
    assert decode == pytest.approx(vae_mib * (1 - dims.vae_encode_params / dims.vae_params))
    assert encode == pytest.approx(max(dims.encoder_stream_params, dims.vae_encode_params) * 4 / 2**20)  # fp32
    whole = RunSettings(device="cuda")  # offload none: every weight stays, nothing moves in halves
    assert resident_weights_mib(dims, whole, Phase.DECODE) > vae_mib


def test_a_streamed_text_encoder_looks_its_tokens_up_on_the_cpu_and_gets_its_table_back(pipeline, image):
    """Streaming leaves UMT5's token table (2 GB in bf16 at full size, the largest weight leaf-level streaming
    would move whole) out of group offloading, looked up where it lies: the same frames, the same weights and
    names, the planner counts the next-largest weight, and clearing the placement leaves no hook behind."""
    from diffusers.hooks import HookRegistry

    from lowvram_studio.engine.placement import (PlacementConfig, apply_placement, clear_placement,
                                                 largest_streamed_parameter)
    from lowvram_studio.engine.wan import WAN_COMPONENTS
    from lowvram_studio.models.wan_configs import ti2v_5b_dims

    encoder = pipeline.text_encoder
    table = encoder.get_input_embeddings()
    before = {name: tensor.clone() for name, tensor in encoder.state_dict().items()}
    apply_placement(pipeline, PlacementConfig(OffloadMode.STREAM, "cpu", WAN_COMPONENTS))
    try:
        assert encoder.get_input_embeddings() is table and encoder.encoder.embed_tokens is table
        assert HookRegistry.check_if_exists_or_initialize(table).get_hook("group_offloading") is None
        assert HookRegistry.check_if_exists_or_initialize(encoder.encoder.block[0].layer[0].SelfAttention.q) \
            .get_hook("group_offloading") is not None  # the rest streams
        assert table._forward_pre_hooks and table._forward_hooks
        assert encoder.state_dict().keys() == before.keys()
        assert largest_streamed_parameter(encoder) == max(p.numel() for n, p in encoder.named_parameters()
                                                          if not n.startswith("shared"))
        streamed = ours(pipeline, image, PLAIN.replace(offload=OffloadMode.STREAM))
    finally:
        clear_placement(pipeline)
    assert not table._forward_pre_hooks and not table._forward_hooks and not hasattr(table, "_lowvram_lookup")
    after = encoder.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert np.abs(streamed - ours(pipeline, image)).max() <= 1e-6
    assert ti2v_5b_dims().encoder_stream_params == 4096 * 10240  # a feed-forward weight, not the 256 k x 4096 table


def test_wan_decoded_frames_leave_the_gpu_as_they_are_made_and_the_planner_counts_one_latent_frame(pipeline, image):
    """The Wan VAE's decoder output moves to the CPU per call, so diffusers assembles the clip there (the GPU would
    hold 1.3 GB at 720p x 121 in fp32, twice that while concatenating); the hook goes with the decode."""
    from lowvram_studio.engine.events import Phase
    from lowvram_studio.models.wan_configs import ti2v_5b_dims
    from lowvram_studio.plan.memory_model import phase_features
    from lowvram_studio.settings import RunSettings

    assert np.abs(ours(pipeline, image, PLAIN.replace(decode=DecodeConfig(tile=16))) -
                  ours(pipeline, image, PLAIN.replace(decode=DecodeConfig(tile=16)))).max() == 0
    assert not pipeline.vae.decoder._forward_hooks
    settings = RunSettings(height=704, width=1280, num_frames=121, device="cuda")
    dims = ti2v_5b_dims()
    assert dims.decode_to_host
    held = phase_features(dims, settings, Phase.DECODE)["decode_output"]
    assert held == pytest.approx(4 * 704 * 1280 * 3 / 2**20)  # one latent frame: 4 pixel frames
    from dataclasses import replace
    assert phase_features(replace(dims, decode_to_host=False), settings, Phase.DECODE)["decode_output"] == \
        pytest.approx(121 * 704 * 1280 * 3 / 2**20)
