"""Demo-model training: the objective matches the inference scheduler, the smoke run learns and
exports weights the demo pipeline loads, and trained weights (when shipped) really move."""

import itertools
import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
from PIL import Image
from safetensors.torch import load_file

from lowvram_studio.demo_training import objective, train, train_config, train_data
from lowvram_studio.demo_training.latent_bank import LatentBank
from lowvram_studio.demo_training.evaluate import STILL_FLOOR, measure_motion, psnr
from lowvram_studio.demo_training.procedural import ClipSpec, MotionClass, make_clip
from lowvram_studio.models.demo import (
    DEMO_VAE_CONFIG,
    SVD_SCHEDULER_CONFIG,
    WEIGHT_FILES,
    build_demo_pipeline,
    demo_model_info,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second OpenMP thread makes every op slower (as --smoke)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_objective_matches_euler_v_prediction_scheduler():
    scheduler = EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(20)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 8, 8)
    model_output = torch.randn_like(x)
    for index in (0, 7, 19):
        scheduler._step_index = index
        sigma = scheduler.sigmas[index]
        t = scheduler.timesteps[index]
        c_in, c_skip, c_out, c_noise = objective.edm_preconditioning(sigma)
        torch.testing.assert_close(c_noise, t)
        torch.testing.assert_close(scheduler.scale_model_input(x, t), c_in * x)
        scheduler._step_index = index
        denoised = scheduler.step(model_output, t, x).pred_original_sample
        torch.testing.assert_close(denoised, c_skip * x + c_out * model_output)


def test_latent_scale_fold_keeps_reconstruction_and_sets_unit_scaled_std():
    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(**DEMO_VAE_CONFIG).eval()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mode(), num_frames=4).sample
        objective.fold_latent_scale(vae, x)
        latents = vae.encode(x).latent_dist.mode()
        after = vae.decode(latents, num_frames=4).sample
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert float(latents.std() * vae.config.scaling_factor) == pytest.approx(1.0, rel=1e-3)


def test_latent_bank_replaces_oldest_clips_and_samples_only_stored_ones():
    bank = LatentBank(capacity=4)
    bank.add({"id": torch.arange(3).float().view(3, 1)})
    drawn = bank.sample(50, torch.Generator().manual_seed(0))["id"].flatten()
    assert set(drawn.tolist()) <= {0.0, 1.0, 2.0}
    bank.add({"id": torch.arange(3, 6).float().view(3, 1)})
    assert bank.size == 4
    assert sorted(bank.tensors["id"].flatten().tolist()) == [2.0, 3.0, 4.0, 5.0]


def test_motion_weights_favour_the_moving_region_and_keep_each_clip_mean_one():
    config = train_config.TrainConfig()
    mean = torch.zeros(2, 3, 4, 8, 8)
    mean[0, 1:, :, 2:4, 2:4] = 2.0  # clip 0: a small moving patch; clip 1: still
    weights = objective.motion_weights(mean, config)
    torch.testing.assert_close(weights.mean(dim=(1, 2, 3, 4)), torch.ones(2))
    assert weights[0, 1, 0, 2, 2] > 3 * weights[0, 1, 0, 6, 6]
    torch.testing.assert_close(weights[1], torch.ones_like(weights[1]))


def test_temporal_difference_l1_sees_flicker_but_not_a_steady_offset():
    target = torch.zeros(1, 4, 3, 8, 8)
    torch.testing.assert_close(objective.temporal_difference_l1(target + 0.3, target), torch.tensor(0.0))
    flicker = target.clone()
    flicker[:, -1] += 0.3  # the last frame pops, as the temporal decoder's edge frames do
    assert float(objective.temporal_difference_l1(flicker, target)) > 0.05


def test_still_oversampling_turns_a_seeded_share_of_clips_still_and_leaves_uniform_streams_alone():
    assert all(train_data.stream_motion(seed, 0.1) is None for seed in range(200))
    forced = [train_data.stream_motion(seed, 0.2) for seed in range(4000)]
    assert set(forced) == {None, MotionClass.STILL}
    # 0.1 of clips are still by their own pick; a further (0.2 - 0.1) / 0.9 of the rest are made still.
    assert np.mean([m is MotionClass.STILL for m in forced]) == pytest.approx(0.1 / 0.9, abs=0.015)
    assert forced == [train_data.stream_motion(seed, 0.2) for seed in range(4000)]


@pytest.fixture
def a_second_per_clock_reading(monkeypatch):
    """The smoke VAE phase can take under a second on a fast CPU, which would leave the 579 s the UNet phase
    needs to start: a clock that advances one second per reading makes "too little time left" machine-independent."""
    clock = itertools.count(int(time.perf_counter()))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))


needs_trained = pytest.mark.skipif(not demo_model_info().trained, reason="trained demo weights not in assets/demo-model")


@needs_trained
def test_init_from_starts_from_the_weights_and_the_decoder_phase_leaves_the_latent_path_bit_identical(
        tmp_path, a_second_per_clock_reading):
    folder = demo_model_info().weights_dir
    shipped = {name: load_file(str(folder / filename)) for name, filename in WEIGHT_FILES.items()}
    # The VAE phase runs; the UNet phase would need 579 s of the 580 left, so it waits for a resume.
    config = replace(train_config.smoke_config(), init_from=str(folder), min_phase_minutes=579 / 60)
    trainer = train.Trainer(config, tmp_path, torch.device("cpu"))
    for name, tensors in shipped.items():
        state = trainer.models[name].state_dict()
        assert all(torch.equal(state[k], v.float()) for k, v in tensors.items()), name
        assert all(v.dtype == torch.float32 for v in state.values())
    trainer.run(minutes=10)
    assert trainer.state.phase == "unet" and trainer.state.step["vae"] == 5
    vae = trainer.models["vae"].state_dict()
    latent_path = [k for k in vae if k.startswith(("encoder.", "quant_conv."))]
    assert latent_path and all(torch.equal(vae[k], shipped["vae"][k].float()) for k in latent_path)
    assert any(not torch.equal(vae[k], shipped["vae"][k].float()) for k in vae if k.startswith("decoder."))
    assert trainer.state.latent_scale_fold is None  # the shipped VAE is folded already
    assert trainer.state.vae_holdout[0]["step"] == 0  # the starting point is measured
    resumed = train.Trainer(config, tmp_path, torch.device("cpu"))
    assert all(torch.equal(v, resumed.models["vae"].state_dict()[k]) for k, v in vae.items())
    unet = resumed.models["unet"].state_dict()
    assert all(torch.equal(unet[k], v.float()) for k, v in shipped["unet"].items())


@needs_trained
def test_init_from_cli_fine_tunes_to_the_end_and_exports_the_unchanged_encoder(tmp_path):
    folder = demo_model_info().weights_dir
    args = ["--smoke", "--init-from", str(folder), "--ckpt-dir", str(tmp_path / "ckpt"), "--minutes", "5", "--final",
            "--export", str(tmp_path / "model")]
    assert train.main(args) == 0
    log = json.loads((tmp_path / "model" / "training_log.json").read_text())
    assert log["phase"] == "done" and log["config"]["init_from"] == str(folder)
    assert log["init"]["from"] == str(folder) and log["latent_scale_fold"] is None
    exported, shipped = load_file(str(tmp_path / "model" / "vae.safetensors")), load_file(str(folder / "vae.safetensors"))
    assert all(torch.equal(exported[k], shipped[k]) for k in shipped if k.startswith(("encoder.", "quant_conv.")))


def test_first_invocation_checkpoint_holds_only_the_frozen_vae_and_a_final_resume_finishes(
        tmp_path, a_second_per_clock_reading):
    ckpt = tmp_path / "ckpt"
    # 10 minutes leave 580 s to train; phases need 579 s to start: the VAE starts, the UNet does not.
    config = replace(train_config.smoke_config(), min_phase_minutes=579 / 60)
    first = train.Trainer(config, ckpt, torch.device("cpu"))
    first.run(minutes=10)
    assert first.state.phase == "unet" and first.state.step["unet"] == 0
    names = sorted(f.name for f in ckpt.glob("*.safetensors"))
    assert names == ["vae-00.safetensors"]
    assert (ckpt / "vae-00.safetensors").stat().st_size < 9e6  # fp16, no optimizer
    assert len(first.state.vae_holdout) >= 1 and np.isfinite(first.state.vae_holdout[-1]["first_frame_psnr_db"])
    assert train.main(["--smoke", "--ckpt-dir", str(ckpt), "--minutes", "5", "--final"]) == 0
    state = json.loads((ckpt / "state.json").read_text())["state"]
    assert state["phase"] == "done" and state["step"] == {"vae": 5, "unet": 3}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    args = [
        "--smoke", "--ckpt-dir", str(root / "ckpt"), "--minutes", "5", "--export", str(root / "model"),
        "--evaluate", str(root / "eval" / "quality.json"), "--eval-clips", "2",
    ]
    assert train.main(args) == 0
    return root


def test_smoke_training_reduces_vae_loss_and_runs_both_phases(smoke_run):
    log = json.loads((smoke_run / "model" / "training_log.json").read_text())
    assert log["phase"] == "done"
    vae_losses = [entry["loss"] for entry in log["log"]["vae"]]
    assert len(vae_losses) == 5 and vae_losses[-1] < vae_losses[0]
    unet_losses = [entry["loss"] for entry in log["log"]["unet"]]
    assert len(unet_losses) == 3 and all(np.isfinite(unet_losses))


def test_smoke_checkpoint_files_fit_through_device_out(smoke_run):
    files = list((smoke_run / "ckpt").iterdir())
    assert len(files) <= 8
    assert all(f.stat().st_size < 16 * 2**20 for f in files)


def test_exported_weights_load_into_demo_pipeline(smoke_run):
    folder = smoke_run / "model"
    info = demo_model_info(folder)
    assert info.trained and info.weights_dir == folder
    assert sum(f.stat().st_size for f in folder.glob("*.safetensors")) < 25e6
    pipeline = build_demo_pipeline(weights=folder)
    image = Image.fromarray(make_clip(3, ClipSpec(num_frames=2, size=64)).frames[0])
    frames = pipeline(image, height=64, width=64, num_frames=2, num_inference_steps=2, output_type="np").frames
    assert frames.shape == (1, 2, 64, 64, 3)
    assert np.isfinite(frames).all()


def test_evaluation_writes_summary_and_gallery(smoke_run):
    report = json.loads((smoke_run / "eval" / "quality.json").read_text())
    assert report["summary"]["clips"] == 2
    assert {r["motion"] for r in report["rows"]} == {"still", "left"}
    assert all(np.isfinite(r["first_frame_psnr_db"]) for r in report["rows"])
    assert (smoke_run / "eval" / "quality.gif").stat().st_size > 0


def test_missing_explicit_weights_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="demo weights not found"):
        build_demo_pipeline(weights=tmp_path)


def test_missing_weights_fall_back_to_random_init_and_say_so(tmp_path):
    info = demo_model_info(tmp_path)
    assert not info.trained and info.weights_dir is None and "random weights" in info.note
    pipeline = build_demo_pipeline(random_init=True)
    assert pipeline.unet.config.in_channels == 8


def _generate(pipeline, clip, num_frames: int, steps: int) -> np.ndarray:
    return pipeline(
        Image.fromarray(clip.frames[0]), height=128, width=128, num_frames=num_frames, num_inference_steps=steps,
        motion_bucket_id=clip.motion_bucket_id, generator=torch.Generator().manual_seed(0), output_type="np",
    ).frames[0]


@needs_trained
def test_trained_model_first_frame_resembles_input_better_than_random_init():
    clips = [make_clip(10**9 + seed, ClipSpec(num_frames=4, size=128)) for seed in (1, 2, 3)]
    scores = {}
    for name, pipeline in (("trained", build_demo_pipeline()), ("random", build_demo_pipeline(random_init=True))):
        scores[name] = np.mean([psnr(_generate(pipeline, clip, 4, 5)[0], clip.frames[0] / 255.0) for clip in clips])
    assert scores["trained"] > scores["random"] + 2.0, scores


@needs_trained
def test_trained_model_moves_a_moving_shape_and_keeps_a_still_scene_still():
    pipeline = build_demo_pipeline()
    # The quality protocol (14 frames, 20 steps): with 8 steps a still scene shimmers at ~0.45 px/frame.
    spec = ClipSpec(num_frames=14, size=128)
    speeds = {
        motion: measure_motion(_generate(pipeline, make_clip(10**9 + 7, spec, motion), 14, 20)).speed
        for motion in (MotionClass.RIGHT, MotionClass.STILL)
    }
    assert speeds[MotionClass.RIGHT] > STILL_FLOOR > speeds[MotionClass.STILL]


@needs_trained
def test_zero_vae_budget_fine_tunes_the_unet_on_the_shipped_vae_as_is(tmp_path):
    folder = demo_model_info().weights_dir
    args = ["--smoke", "--init-from", str(folder), "--ckpt-dir", str(tmp_path / "ckpt"), "--vae-minutes", "0",
            "--minutes", "5", "--final", "--export", str(tmp_path / "model")]
    assert train.main(args) == 0
    log = json.loads((tmp_path / "model" / "training_log.json").read_text())
    assert log["step"] == {"vae": 0, "unet": 3} and log["log"]["vae"] == []
    exported, shipped = load_file(str(tmp_path / "model" / "vae.safetensors")), load_file(str(folder / "vae.safetensors"))
    assert all(torch.equal(exported[k], shipped[k]) for k in shipped)


@needs_trained
def test_zero_unet_budget_fine_tunes_the_decoder_alone(tmp_path):
    folder = demo_model_info().weights_dir
    args = ["--smoke", "--init-from", str(folder), "--ckpt-dir", str(tmp_path / "ckpt"), "--unet-minutes", "0",
            "--minutes", "5", "--export", str(tmp_path / "model")]
    assert train.main(args) == 0
    log = json.loads((tmp_path / "model" / "training_log.json").read_text())
    assert log["phase"] == "done" and log["step"] == {"vae": 5, "unet": 0}
    for name in ("unet", "image_encoder"):
        exported, shipped = load_file(str(tmp_path / "model" / WEIGHT_FILES[name])), load_file(str(folder / WEIGHT_FILES[name]))
        assert all(torch.equal(exported[k], shipped[k]) for k in shipped)


def test_zero_vae_budget_without_init_from_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="only a fine-tune"):
        train.main(["--smoke", "--ckpt-dir", str(tmp_path / "ckpt"), "--vae-minutes", "0", "--minutes", "1"])


def unet_step_trainers(tmp_path, device: torch.device) -> tuple:
    """Two trainers from the same seed in the UNet phase, one eager, one replaying a CUDA graph."""
    config = replace(train_config.smoke_config(), init_from=None, vae_steps=0)
    trainers = []
    for graphed in (False, True):
        trainer = train.Trainer(replace(config, cuda_graph=graphed), tmp_path / str(graphed), device)
        trainer.state.phase = "unet"
        trainer._make_optimizer()
        trainers.append(trainer)
    return config, trainers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (run on the lent GPU)")
def test_graphed_unet_step_follows_the_eager_step(tmp_path):
    device = torch.device("cuda")
    config, (eager, graphed) = unet_step_trainers(tmp_path, device)
    assert graphed.train_step.graphed and not eager.train_step.graphed
    bank = LatentBank(8)
    clips = torch.from_numpy(np.stack([make_clip(i, ClipSpec(num_frames=2, size=64)).frames for i in range(4)]))
    with eager.autocast:
        bank.add(objective.encode_for_unet(eager.models["vae"], train_data.to_model_range(clips, device), torch.full((4,), 64.0), config, eager.generator))
    def set_lr(lr: float) -> None:
        for trainer in (eager, graphed):
            for group in trainer.optimizer.param_groups:
                group["lr"].fill_(lr) if torch.is_tensor(group["lr"]) else group.update(lr=lr)

    def batch() -> dict:
        return objective.draw_unet_inputs(bank.sample(config.unet_batch, eager.generator), config, eager.generator)

    def flat(trainer, attr: str) -> torch.Tensor:
        return torch.cat([getattr(p, attr).flatten().float() for p in trainer.models["unet"].parameters()])

    # lr 0: the weights stay equal, so every step compares forward and backward on the same weights.
    set_lr(0.0)
    before = flat(eager, "data")
    for step in range(6):  # 3 eager warm-up steps, the capture, 2 replays
        inputs = batch()
        a, b = eager.train_step(inputs), graphed.train_step(inputs)
        # bf16 autocast and atomics in cuDNN / attention backward: equal to bf16's precision, not bitwise.
        torch.testing.assert_close(a["loss"], b["loss"], rtol=2e-2, atol=0)
        difference = (flat(eager, "grad") - flat(graphed, "grad")).norm() / flat(eager, "grad").norm()
        assert difference < 2e-2, (step, float(difference))
    assert graphed.train_step.graph is not None
    assert torch.equal(flat(graphed, "data"), before)
    # The learning rate set in place reaches the captured optimizer: both take the same update.
    set_lr(1e-3)
    inputs = batch()
    eager.train_step(inputs), graphed.train_step(inputs)
    updates = flat(eager, "data") - before, flat(graphed, "data") - before
    assert updates[1].abs().max() > 1e-4
    assert torch.nn.functional.cosine_similarity(*updates, dim=0) > 0.95
