"""Train the built-in demo model (SVD architecture, a few M parameters) on procedural video.

Two phases share one wall-clock budget and one checkpoint folder:

1. **VAE**: ``AutoencoderKLTemporalDecoder`` learns to reconstruct clips (encoder per frame, temporal
   decoder over the clip; L1 + MSE + frame-difference L1 against flicker + a small KL). At the end its
   latent scale is folded into the weights so that ``latents * scaling_factor`` (0.18215, as the
   pipeline uses it) has unit variance. 8 clips per step; the held-out round trip is logged as it goes.
2. **UNet**: ``UNetSpatioTemporalConditionModel`` and the small CLIP image encoder learn to denoise
   with SVD's conditioning and the EDM v-prediction objective (``objective.py``); conditioning is
   dropped together (zeros, as the pipeline's unconditional branch) so classifier-free guidance works.
   Targets are posterior means (a still clip's frames are then identical); still clips can be
   oversampled (``still_fraction``). Clips are encoded once into a ``LatentBank`` on the device that
   a few fresh clips refresh every step. On CUDA the step (loss, backward, clip, AdamW) is replayed
   from a CUDA graph (``graphed_step.py``): eager, this small UNet is launch-bound.

**Fine-tuning** (``--init-from DIR``): the models start from exported fp16 weights (fp32 master
copies, fresh optimizers with a short warm-up); the VAE phase then trains the decoder only (encoder
and ``quant_conv`` frozen, no second latent-scale fold), so the UNet's latent space stays the one the
UNet phase continues in. ``FINETUNE_DEFAULTS`` (``train_config.py``) holds the recipe. A phase budget of 0
(``--vae-minutes 0`` / ``--unet-minutes 0``) skips that phase: a UNet-only or decoder-only fine-tune.

Every invocation trains for ``--minutes`` of wall time, checkpoints every few minutes and at the end,
and resumes from ``--ckpt-dir`` (only what the current phase needs: a finished VAE in fp16, an untouched
UNet not at all). ``--final`` ends the UNet phase at this invocation's deadline so that ``--export DIR``
(fp16 safetensors and the training log) and ``--evaluate OUT.json`` (``evaluate.py``) follow.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from lowvram_studio.demo_training.checkpoint import (
    load_optimizer,
    load_sharded,
    optimizer_tensors,
    restore_rng,
    rng_blob,
    save_sharded,
)
from lowvram_studio.demo_training.graphed_step import TrainStep
from lowvram_studio.demo_training.latent_bank import LatentBank
from lowvram_studio.demo_training.objective import (
    draw_unet_inputs,
    encode_for_unet,
    fold_latent_scale,
    temporal_difference_l1,
    unet_loss_on,
    vae_loss,
)
from lowvram_studio.demo_training.procedural import ClipSpec, make_clip
from lowvram_studio.demo_training.train_config import FINETUNE_DEFAULTS, TrainConfig, smoke_config
from lowvram_studio.demo_training.train_data import make_loader, to_model_range
from lowvram_studio.models.demo import (
    DEMO_IMAGE_ENCODER_CONFIG,
    DEMO_UNET_CONFIG,
    DEMO_VAE_CONFIG,
    WEIGHT_FILES,
)

logger = logging.getLogger(__name__)

SAVE_MARGIN_S = 20.0  # an invocation stops training this long before its --minutes run out
HOLDOUT_FIRST_SEED = 10**9 + 10**6  # VAE round-trip clips: held out, apart from evaluate.py's


# ---------------------------------------------------------------------------------------------
# Models


def build_models(seed: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {
        "vae": AutoencoderKLTemporalDecoder(**DEMO_VAE_CONFIG),
        "unet": UNetSpatioTemporalConditionModel(**DEMO_UNET_CONFIG),
        "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**DEMO_IMAGE_ENCODER_CONFIG)),
    }


def load_exported(models: dict[str, torch.nn.Module], folder: Path) -> None:
    """Load exported fp16 safetensors (``export``'s files) into the models as fp32 master weights."""
    missing = [name for name in WEIGHT_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise SystemExit(
            f"error: --init-from {folder} lacks {', '.join(missing)}; give a folder that --export wrote (e.g. assets/demo-model)"
        )
    for name, filename in WEIGHT_FILES.items():
        models[name].load_state_dict({k: v.float() for k, v in load_file(str(folder / filename)).items()})
    logger.info("initialised from %s", folder)


def frozen_for_latents(vae: AutoencoderKLTemporalDecoder) -> list[torch.nn.Module]:
    """The VAE parts that produce the latent (and its scale): frozen when only the decoder is tuned."""
    return [vae.encoder, vae.quant_conv]





# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainState:
    """Where a run stands; JSON in the checkpoint folder."""

    phase: str = "vae"  # vae -> unet -> done
    step: dict = field(default_factory=lambda: {"vae": 0, "unet": 0})
    seconds: dict = field(default_factory=lambda: {"vae": 0.0, "unet": 0.0})
    clips: dict = field(default_factory=lambda: {"vae": 0, "unet": 0})
    latent_scale_fold: float | None = None  # None when fine-tuning: the exported VAE is already folded
    latent_scaled_std: float | None = None  # std of latents x scaling_factor at the end of the VAE phase
    init: dict | None = None  # fine-tune: the folder started from and its training log's steps
    vae_holdout: list = field(default_factory=list)  # held-out round-trip PSNR during the VAE phase
    log: dict = field(default_factory=lambda: {"vae": [], "unet": []})


class Trainer:
    """Runs the phases inside one invocation's wall budget and owns the checkpoint folder."""

    def __init__(self, config: TrainConfig, ckpt_dir: Path, device: torch.device) -> None:
        self.config = config
        self.ckpt_dir = ckpt_dir
        self.device = device
        self.models = build_models(config.seed)
        self.state = TrainState()
        self.optimizer: torch.optim.Optimizer | None = None
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed + 17)
        # No cast cache: a CUDA graph must not keep casts made during capture; the demo's weights are used once per pass.
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
            if device.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )
        self._resume()

    # -- checkpoint ----------------------------------------------------------------------------
    @property
    def decoder_only(self) -> bool:
        """Fine-tuning keeps the VAE's latent space: its phase trains the decoder only."""
        return self.config.init_from is not None

    def _trainable(self) -> list[torch.nn.Module]:
        if self.state.phase == "vae":
            return [self.models["vae"]]
        return [self.models["unet"], self.models["image_encoder"]]

    def _make_optimizer(self) -> None:
        for name, module in self.models.items():
            module.to(self.device)
            trainable = any(module is m for m in self._trainable())
            module.train(trainable).requires_grad_(trainable)
        if self.state.phase == "vae" and self.decoder_only:
            for module in frozen_for_latents(self.models["vae"]):
                module.eval().requires_grad_(False)
        params = [p for m in self._trainable() for p in m.parameters() if p.requires_grad]
        lr = self.config.vae_lr if self.state.phase == "vae" else self.config.unet_lr
        if self.graphed:  # a captured AdamW reads its step count and learning rate from device tensors
            self.optimizer = torch.optim.AdamW(
                params, lr=torch.tensor(lr, device=self.device), betas=(0.9, 0.99), weight_decay=0.01, capturable=True
            )
        else:
            self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
        self.train_step = TrainStep(self._step_fn, self.optimizer, graphed=self.graphed)

    @property
    def graphed(self) -> bool:
        return self.state.phase == "unet" and self.config.cuda_graph and self.device.type == "cuda"

    def _set_learning_rate(self, phase: str) -> None:
        lr = self._learning_rate(phase)
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _step_fn(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss, backward, clipped gradients, AdamW: what a CUDA graph replays in the UNet phase."""
        with self.autocast:
            if self.state.phase == "vae":
                loss, stats = vae_loss(self.models["vae"], inputs["x"], self.config, decoder_only=self.decoder_only)
            else:
                loss, stats = unet_loss_on(self.models, inputs, self.config)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()
        return stats

    def _resume(self) -> None:
        if self.config.init_from is not None:  # a resume's checkpoint then overrides what it holds
            folder = Path(self.config.init_from)
            load_exported(self.models, folder)
            log_path = folder / "training_log.json"
            steps = json.loads(log_path.read_text()).get("step") if log_path.exists() else None
            self.state.init = {"from": str(folder), "steps": steps}
        state_path = self.ckpt_dir / "state.json"
        if state_path.exists():
            saved = json.loads(state_path.read_text())
            self.state = TrainState(**saved["state"])
            restore_rng(saved["rng"])
            self.generator.set_state(torch.frombuffer(bytearray(base64.b64decode(saved["generator"])), dtype=torch.uint8))
            for name in ("vae", "unet", "image_encoder"):
                tensors = load_sharded(self.ckpt_dir, name)
                if tensors:
                    self.models[name].load_state_dict({k: v.float() for k, v in tensors.items()})
            logger.info("resumed: phase %s, steps %s", self.state.phase, self.state.step)
        self._make_optimizer()
        moments = load_sharded(self.ckpt_dir, f"optim_{self.state.phase}")
        if moments:
            load_optimizer(self.optimizer, moments)

    def _needed_weights(self) -> dict[str, torch.Tensor]:
        """Per component, the tensors a resume needs: a frozen VAE in fp16, an untouched UNet not at all."""
        needed = {}
        for name, module in self.models.items():
            if name == "vae":
                frozen = self.state.phase != "vae"
                needed[name] = {k: (v.half() if frozen else v.float()) for k, v in module.state_dict().items()}
            elif self.state.step["unet"] > 0:  # before its first step the UNet is its seeded init (or --init-from's)
                needed[name] = {k: v.float() for k, v in module.state_dict().items()}
        return needed

    def save(self) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.ckpt_dir.glob("*.safetensors"):
            stale.unlink()
        for name, tensors in self._needed_weights().items():
            save_sharded(tensors, self.ckpt_dir, name)
        moments = optimizer_tensors(self.optimizer)
        if self.state.phase != "done" and moments:
            save_sharded(moments, self.ckpt_dir, f"optim_{self.state.phase}")
        generator = base64.b64encode(self.generator.get_state().cpu().numpy().tobytes()).decode()
        saved = {"config": asdict(self.config), "state": asdict(self.state), "rng": rng_blob(), "generator": generator}
        tmp = self.ckpt_dir / "state.json.tmp"
        tmp.write_text(json.dumps(saved))
        tmp.replace(self.ckpt_dir / "state.json")
        (self.ckpt_dir / "training_log.json").write_text(json.dumps(self.training_log(), indent=1))
        size = sum(f.stat().st_size for f in self.ckpt_dir.iterdir()) / 2**20
        logger.info("checkpoint saved: phase %s, steps %s, %.1f MiB", self.state.phase, self.state.step, size)

    def training_log(self) -> dict:
        return {"config": asdict(self.config), "device": str(self.device), **asdict(self.state)}

    # -- schedule ------------------------------------------------------------------------------
    def _progress(self, phase: str) -> float:
        steps_budget = getattr(self.config, f"{phase}_steps")
        if steps_budget is not None:
            return self.state.step[phase] / steps_budget
        return self.state.seconds[phase] / (60 * getattr(self.config, f"{phase}_minutes"))

    def _learning_rate(self, phase: str) -> float:
        base = self.config.vae_lr if phase == "vae" else self.config.unet_lr
        warm = min(1.0, (self.state.step[phase] + 1) / self.config.warmup_steps)
        p = min(1.0, self._progress(phase))
        return base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    # -- loop ----------------------------------------------------------------------------------
    def run(self, minutes: float, final: bool = False) -> None:
        """Train until this invocation's budget (minus time to save) or every phase is done.

        With ``final`` the UNet phase's time budget is set, once its data is ready, to end at this
        invocation's deadline, so the run finishes here and export and evaluation can follow.
        """
        start = time.perf_counter()
        deadline = start + 60 * minutes - SAVE_MARGIN_S
        last_save = start
        while self.state.phase != "done":
            phase = self.state.phase
            if self.state.step[phase] == 0 and 0 in (getattr(self.config, f"{phase}_minutes"), getattr(self.config, f"{phase}_steps")):
                self.skip_phase(phase)
                continue
            left = deadline - time.perf_counter()
            if self.state.step[phase] == 0 and left < 60 * self.config.min_phase_minutes and not final:
                logger.info("%s phase starts in the next invocation (%.0f s left here)", phase, left)
                break
            if left <= 0:
                break
            last_save = self._run_phase(phase, deadline, last_save, final)
            if self.state.phase == phase:  # stopped by the deadline
                break
        self.save()

    def skip_phase(self, phase: str) -> None:
        """A zero budget: the phase's models stay as --init-from gave them (a UNet-only or decoder-only fine-tune)."""
        if not self.decoder_only:
            raise SystemExit(f"error: a {phase.upper()} budget of 0 skips its phase, which only a fine-tune (--init-from DIR) can do")
        logger.info("%s phase skipped (budget 0): its weights stay those of %s", phase, self.config.init_from)
        self.state.phase = "unet" if phase == "vae" else "done"
        self._make_optimizer()

    def _run_phase(self, phase: str, deadline: float, last_save: float, final: bool) -> float:
        batch = self.config.vae_batch if phase == "vae" else self.config.bank_refresh
        loader = iter(make_loader(self.config, phase, self.state.clips[phase], batch))
        bank = self._fill_bank(loader) if phase == "unet" else None
        if phase == "vae" and self.state.step["vae"] == 0 and self.decoder_only:
            self._log_holdout()  # where the fine-tune starts from
        if final and phase == "unet" and self.config.unet_steps is None:
            budget = self.state.seconds["unet"] + max(1.0, deadline - time.perf_counter())
            self.config = replace(self.config, unet_minutes=budget / 60)
            logger.info("final invocation: UNet phase budget %.2f min ends at this invocation's deadline", self.config.unet_minutes)
        window: list[dict] = []
        last = time.perf_counter()
        while True:
            self._set_learning_rate(phase)
            frames, buckets = next(loader)
            fetched = time.perf_counter()
            x = to_model_range(frames, self.device)
            if phase == "vae":
                inputs = {"x": x}
            else:
                with self.autocast:
                    bank.add(encode_for_unet(self.models["vae"], x, buckets, self.config, self.generator))
                inputs = draw_unet_inputs(bank.sample(self.config.unet_batch, self.generator), self.config, self.generator)
            stats = self.train_step(inputs)
            stats["data_wait_s"] = torch.tensor(fetched - last)
            now = time.perf_counter()
            self.state.step[phase] += 1
            self.state.clips[phase] += x.shape[0]
            self.state.seconds[phase] += now - last  # wall time, data waits and logging included
            window.append(stats)
            done = self._progress(phase) >= 1.0 or (final and phase == "unet" and now >= deadline)
            if len(window) == self.config.log_every or done:
                self._log(phase, window)
                window = []
            if phase == "vae" and self.state.step[phase] % self.config.holdout_every == 0:
                self._log_holdout()
            if done:
                self._finish_phase(phase, x)
                return last_save
            if now >= deadline:
                if window:
                    self._log(phase, window)
                return last_save
            if now - last_save > 60 * self.config.save_every_minutes:
                self.save()
                last_save = time.perf_counter()
            last = now

    def _fill_bank(self, loader) -> LatentBank:
        """Encode the first clips of the UNet phase (a resume re-encodes from where its stream stands)."""
        start = time.perf_counter()
        bank = LatentBank(self.config.bank_size)
        while bank.size < min(self.config.bank_initial, self.config.bank_size):
            frames, buckets = next(loader)
            with self.autocast:
                bank.add(encode_for_unet(self.models["vae"], to_model_range(frames, self.device), buckets, self.config, self.generator))
            self.state.clips["unet"] += frames.shape[0]
        logger.info(
            "latent bank: %d clips encoded in %.1f s (%.0f MiB; holds %d, %d fresh per step)",
            bank.size, time.perf_counter() - start, bank.nbytes() / 2**20, self.config.bank_size, self.config.bank_refresh,
        )
        return bank

    @torch.no_grad()
    def _log_holdout(self) -> None:
        """Encode -> decode round trip (posterior mode, fp32) of held-out clips, PSNR in dB on [0, 1]."""
        vae = self.models["vae"]
        was_training = vae.training
        vae.eval()
        spec = ClipSpec(num_frames=self.config.num_frames, size=self.config.size)
        first_mse, all_mse, temporal = [], [], []
        for i in range(self.config.holdout_clips):
            frames = torch.from_numpy(make_clip(HOLDOUT_FIRST_SEED + i, spec).frames)[None]
            x = to_model_range(frames, self.device)[0]
            recon = vae.decode(vae.encode(x).latent_dist.mode(), num_frames=x.shape[0]).sample.float().clamp(-1, 1)
            error = ((recon - x) / 2) ** 2
            first_mse.append(float(error[0].mean()))
            all_mse.append(error.mean(dim=(1, 2, 3)).cpu())
            temporal.append(float(temporal_difference_l1(recon[None], x[None])) / 2)
        vae.train(was_training)
        if self.decoder_only:
            for module in frozen_for_latents(vae):
                module.eval()
        entry = {
            "step": self.state.step["vae"],
            "first_frame_psnr_db": float(sum(-10 * math.log10(max(m, 1e-10)) for m in first_mse) / len(first_mse)),
            "all_frames_psnr_db": float((-10 * torch.log10(torch.cat(all_mse).clamp(min=1e-10))).mean()),
            "temporal_l1": sum(temporal) / len(temporal),  # frame-to-frame change error, [0, 1] units
        }
        self.state.vae_holdout.append(entry)
        logger.info(
            "vae held-out round trip at step %d: first frame %.2f dB, all frames %.2f dB, temporal L1 %.4f (%d clips)",
            entry["step"], entry["first_frame_psnr_db"], entry["all_frames_psnr_db"], entry["temporal_l1"],
            self.config.holdout_clips,
        )

    def _log(self, phase: str, window: list[dict]) -> None:
        # Stats stay on the device until here: no host sync per step.
        entry = {k: float(torch.stack([w[k].float().cpu() for w in window]).mean()) for k in window[0]}
        if "mse" in entry:
            entry["psnr_db"] = 10 * math.log10(4.0 / max(entry["mse"], 1e-10))  # [-1, 1]: peak-to-peak 2
        if self.device.type == "cuda":
            entry["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        entry.update(step=self.state.step[phase], seconds=round(self.state.seconds[phase], 2), lr=self._learning_rate(phase))
        self.state.log[phase].append(entry)
        steps = len(window)
        logger.info(
            "%s step %d %.0fs loss %.4f%s lr %.2e (%.3f s/step, data wait %.3fs/step)",
            phase, entry["step"], entry["seconds"], entry["loss"],
            f" psnr {entry['psnr_db']:.2f} dB" if "psnr_db" in entry else "",
            entry["lr"], self._step_seconds(phase, steps), entry["data_wait_s"],
        )

    def _step_seconds(self, phase: str, steps: int) -> float:
        log = self.state.log[phase]
        if len(log) < 2:
            return log[-1]["seconds"] / max(1, log[-1]["step"])
        return (log[-1]["seconds"] - log[-2]["seconds"]) / max(1, log[-1]["step"] - log[-2]["step"])

    def _finish_phase(self, phase: str, x: torch.Tensor) -> None:
        if phase == "vae":
            vae = self.models["vae"]
            vae.eval()
            with torch.no_grad():
                for p in vae.parameters():  # the exported VAE is fp16: train the UNet on exactly it
                    p.copy_(p.half().float())
            if not self.decoder_only:  # exported weights are folded already: never fold twice
                self.state.latent_scale_fold = fold_latent_scale(vae, x.flatten(0, 1).float())
                with torch.no_grad():
                    for p in vae.parameters():
                        p.copy_(p.half().float())
            with torch.no_grad():
                latents = vae.encode(x.flatten(0, 1).float()).latent_dist.mode()
            self.state.latent_scaled_std = float(latents.std() * vae.config.scaling_factor)
            logger.info(
                "VAE done; latent scale %s; latents x %.5f have std %.3f on the last batch",
                "kept (decoder only)" if self.decoder_only else f"folded by {self.state.latent_scale_fold:.4f}",
                vae.config.scaling_factor, self.state.latent_scaled_std,
            )
            self._log_holdout()
            self.state.phase = "unet"
        else:
            self.state.phase = "done"
        self._make_optimizer()


# ---------------------------------------------------------------------------------------------
# Export


def export(trainer: Trainer, folder: Path) -> dict[str, int]:
    """fp16 safetensors per component (the names demo.py loads) plus the training log."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, filename in WEIGHT_FILES.items():
        tensors = {k: v.detach().half().contiguous().cpu() for k, v in trainer.models[name].state_dict().items()}
        save_file(
            tensors, str(folder / filename),
            metadata={"format": "pt", "trained_steps": json.dumps(trainer.state.step), "init": json.dumps(trainer.state.init)},
        )
        sizes[filename] = (folder / filename).stat().st_size
    (folder / "training_log.json").write_text(json.dumps(trainer.training_log(), indent=1))
    logger.info("exported %s (%.1f MB)", folder, sum(sizes.values()) / 1e6)
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lowvram_studio.demo_training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt-dir", type=Path, default=Path("/tmp/demo-ckpt"))
    parser.add_argument("--minutes", type=float, default=9.0, help="wall budget of this invocation's training")
    parser.add_argument(
        "--final", action="store_true",
        help="finish training in this invocation: the UNet phase's schedule ends at its deadline (then --export, --evaluate)",
    )
    budget = "phase budget, minutes of training wall time (default: TrainConfig); may change on resume"
    parser.add_argument("--vae-minutes", type=float, default=None, help=budget)
    parser.add_argument("--unet-minutes", type=float, default=None, help=budget)
    parser.add_argument("--vae-batch", type=int, default=None, help="clips per VAE step")
    parser.add_argument("--unet-batch", type=int, default=None, help="clips per UNet step")
    parser.add_argument(
        "--temporal-weight", type=float, default=None,
        help="weight of the VAE loss's frame-difference term (default 1; higher fights the decoder's pops at a clip's ends)",
    )
    parser.add_argument("--seed", type=int, default=None, help="a new run's seed (default 0; fine-tune 1)")
    parser.add_argument(
        "--init-from", type=Path, default=None,
        help="fine-tune: start from the fp16 safetensors an --export wrote (e.g. assets/demo-model); "
        "the VAE phase then trains the decoder only",
    )
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: CPUs - 2, at most 14)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--export", type=Path, default=None, help="write fp16 safetensors here when training is done")
    parser.add_argument("--evaluate", type=Path, default=None, help="write the quality evaluation JSON here")
    parser.add_argument("--eval-clips", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="a few steps at tiny size (CPU test)")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The checkpoint's config when resuming (else the smoke or default one), then explicit flags."""
    state_path = args.ckpt_dir / "state.json"
    if state_path.exists():
        config = TrainConfig(**json.loads(state_path.read_text())["config"])
        if args.seed is not None and args.seed != config.seed:
            raise SystemExit(f"error: --seed {args.seed} differs from the checkpoint's seed {config.seed}; use a new --ckpt-dir")
        if args.init_from is not None and str(args.init_from) != config.init_from:
            raise SystemExit(
                f"error: --init-from {args.init_from} differs from the checkpoint's {config.init_from}; use a new --ckpt-dir"
            )
    else:
        config = smoke_config() if args.smoke else TrainConfig()
        if args.init_from is not None:
            config = replace(config, init_from=str(args.init_from), **({} if args.smoke else FINETUNE_DEFAULTS))
        config = replace(config, seed=args.seed if args.seed is not None else config.seed)
    overrides = {
        "vae_minutes": args.vae_minutes, "unet_minutes": args.unet_minutes,
        "vae_batch": args.vae_batch, "unet_batch": args.unet_batch, "workers": args.workers,
        "temporal_weight": args.temporal_weight,
    }
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    args = parse_args(argv)
    config = resolve_config(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    threads = torch.get_num_threads()
    if args.smoke and device.type == "cpu":
        # Tiny tensors: a second thread buys nothing, and on a busy machine the OpenMP barrier of
        # two threads on two shared cores makes every op ~10x slower.
        torch.set_num_threads(1)
    try:
        return _train_export_evaluate(args, config, device)
    finally:
        torch.set_num_threads(threads)


def _train_export_evaluate(args: argparse.Namespace, config: TrainConfig, device: torch.device) -> int:
    trainer = Trainer(config, args.ckpt_dir, device)
    trainer.run(args.minutes, final=args.final)
    if trainer.state.phase != "done":
        logger.info("training continues: phase %s, steps %s; run again to resume", trainer.state.phase, trainer.state.step)
        return 0
    if args.export is not None:
        sizes = export(trainer, args.export)
        logger.info("exported %s: %s", args.export, sizes)
    if args.evaluate is not None:
        from lowvram_studio.demo_training.evaluate import evaluate_folder

        report = evaluate_folder(args.export, args.evaluate, num_clips=args.eval_clips, device=device, smoke=args.smoke)
        logger.info("evaluation summary: %s", json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
