"""What the demo model is trained to do: SVD's conditioning and EDM v-prediction losses.

The UNet sees its inputs exactly as ``StableVideoDiffusionPipeline`` feeds them at inference: the
noise-augmented first frame's VAE latent (posterior mode, *not* multiplied by the scaling factor)
concatenated on channels to every frame, the image embedding as the one cross-attention token, and
``added_time_ids = [fps - 1, motion_bucket_id, noise_aug_strength]``. The loss is EDM's denoiser loss
(Karras et al. 2022, "Elucidating the design space", table 1, sigma_data = 1; SVD paper appendix D)
in the parametrisation ``EulerDiscreteScheduler`` (v-prediction, continuous timesteps) inverts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLTemporalDecoder

# The pipeline's own resize (antialiased bicubic, as the original SVD code): reused so the image
# encoder sees exactly what it will see at inference.
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

from lowvram_studio.models.demo import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD

if TYPE_CHECKING:
    from lowvram_studio.demo_training.train_config import TrainConfig


@torch.no_grad()
def fold_latent_scale(vae: AutoencoderKLTemporalDecoder, x: torch.Tensor) -> float:
    """Rescale the VAE so that posterior means times scaling_factor have unit std; returns the factor.

    Multiplies the mean rows of ``quant_conv`` by s (log-variance rows shift by 2 ln s) and divides the
    decoder's ``conv_in`` weights by s: encode -> decode is unchanged, only the latent unit moves.
    """
    latents = vae.encode(x).latent_dist.mode().float()
    target = 1.0 / vae.config.scaling_factor
    s = target / float(latents.std())
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= s
    vae.quant_conv.bias[:c] *= s
    vae.quant_conv.bias[c:] += 2 * math.log(s)
    vae.decoder.conv_in.weight /= s
    return s


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the image encoder's input, the preprocessing of the pipeline's ``_encode_image``."""
    x = _resize_with_antialiasing(images, (224, 224))
    x = (x + 1.0) / 2.0
    mean = torch.tensor(CLIP_IMAGE_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_IMAGE_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def image_gradient_l1(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical pixel differences: penalises blurred edges directly."""
    dx = (recon[..., :, 1:] - recon[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (recon[..., 1:, :] - recon[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def temporal_difference_l1(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between frame-to-frame changes of (B, F, ...) clips: penalises flicker a per-frame loss allows.

    The temporal decoder's time convolutions make the first and last frames of a clip of identical
    latents differ from the middle ones (shipped VAE: the round trip of a still clip moves 0.45 px/frame
    at its ends), which the optical-flow check reads as motion.
    """
    return ((recon[:, 1:] - recon[:, :-1]) - (target[:, 1:] - target[:, :-1])).abs().mean()


def vae_loss(
    vae: AutoencoderKLTemporalDecoder, x: torch.Tensor, config: TrainConfig, decoder_only: bool = False
) -> tuple[torch.Tensor, dict]:
    """Reconstruction (L1 + MSE, temporal and optionally edge L1) of whole clips; x is (B, F, 3, H, W).

    The full VAE decodes a posterior sample and adds a small KL. ``decoder_only`` (fine-tuning a VAE
    whose latent space a trained UNet depends on) encodes without gradients and decodes the posterior
    mean, which is what the UNet is trained on and what the held-out round trip measures.
    """
    b, f = x.shape[:2]
    flat = x.flatten(0, 1)
    if decoder_only:
        with torch.no_grad():
            z = vae.encode(flat).latent_dist.mode()
    else:
        posterior = vae.encode(flat).latent_dist
        z = posterior.sample()
    recon = vae.decode(z, num_frames=f).sample.float()
    mse = F.mse_loss(recon, flat)
    l1 = (recon - flat).abs().mean()
    loss = l1 + mse
    stats = {"l1": l1.detach(), "mse": mse.detach()}
    if not decoder_only:
        kl = posterior.kl().mean() / z[0].numel()
        loss = loss + config.kl_weight * kl
        stats["kl"] = kl.detach()
    if config.temporal_weight:
        temporal = temporal_difference_l1(recon.unflatten(0, (b, f)), x)
        loss = loss + config.temporal_weight * temporal
        stats["temporal_l1"] = temporal.detach()
    if config.edge_weight:
        edge = image_gradient_l1(recon, flat)
        loss = loss + config.edge_weight * edge
        stats["edge_l1"] = edge.detach()
    return loss, {"loss": loss.detach(), **stats}


def sample_sigmas(b: int, config: TrainConfig, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Log-normal(P_mean, P_std) sigmas, a fraction log-uniform over [sigma_min, sigma_max]."""
    normal = torch.randn(b, generator=generator, device=device) * config.p_std + config.p_mean
    lo, hi = math.log(config.sigma_min), math.log(config.sigma_max)
    uniform = torch.rand(b, generator=generator, device=device) * (hi - lo) + lo
    pick = torch.rand(b, generator=generator, device=device) < config.high_sigma_fraction
    return torch.where(pick, uniform, normal).exp()


def edm_preconditioning(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_in, c_skip, c_out, c_noise) of EDM with sigma_data = 1 in the sign convention of
    ``EulerDiscreteScheduler`` v-prediction: denoised = c_skip * x + c_out * F(c_in * x, c_noise)."""
    c_in = 1 / (sigma**2 + 1).sqrt()
    c_skip = 1 / (sigma**2 + 1)
    c_out = -sigma / (sigma**2 + 1).sqrt()
    return c_in, c_skip, c_out, 0.25 * sigma.log()


@torch.no_grad()
def encode_for_unet(
    vae: AutoencoderKLTemporalDecoder, x: torch.Tensor, buckets: torch.Tensor, config: TrainConfig, generator: torch.Generator
) -> dict:
    """Everything the UNet step needs from the frozen VAE, computed once per clip (the latent bank).

    x is (B, F, 3, H, W) in [-1, 1]. Returns the posterior mean of every frame (scaled by
    ``scaling_factor``), the first frame (uint8, the image encoder's input) and the pipeline's image
    latent: the first frame plus noise of strength ``aug`` (log-normal around the pipeline default
    0.02, one draw per clip), posterior mode, unscaled.

    The UNet learns the posterior mean, not a sample: a sample draws independent noise per frame
    (std ~0.06 of the unit-std scaled latent with the shipped VAE), so a still clip's target frames
    differ and the model learns to make them flicker (decoded: 0.5-1.0 px/frame of optical flow on a
    still scene, against 0.45 from the posterior mean).
    """
    b, f = x.shape[:2]
    first = x[:, 0]
    posterior = vae.encode(x.flatten(0, 1)).latent_dist
    scale = vae.config.scaling_factor
    aug = (torch.randn(b, generator=generator, device=x.device) * 0.8 + math.log(config.noise_aug_mean)).exp().clamp(max=0.3)
    noisy_first = first + aug.view(b, 1, 1, 1) * torch.randn(first.shape, generator=generator, device=x.device)
    return {
        "mean": (posterior.mean.float() * scale).unflatten(0, (b, f)).half(),
        "first": ((first + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8),
        "image_latent": vae.encode(noisy_first).latent_dist.mode().half(),
        "aug": aug.float(),
        "bucket": buckets.to(x.device).float(),
    }


def motion_weights(mean: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Per-position loss weights (B, F, 1, h, w) that favour where the clip moves, mean 1 per clip.

    A small arrow covers ~3 % of the frame, so an unweighted loss hardly rewards getting its motion
    right; pans and zooms move everywhere and still clips nowhere, so both stay uniformly weighted.
    """
    change = (mean - mean[:, :1]).abs().mean(dim=2, keepdim=True)
    weights = 1.0 + config.motion_weight * (change / config.motion_threshold).clamp(max=1.0)
    return weights / weights.mean(dim=(1, 2, 3, 4), keepdim=True)


def draw_unet_inputs(batch: dict, config: TrainConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every random draw and input preparation of a UNet step, apart from the differentiable part.

    Kept out of ``unet_loss_on`` so that the latter is a fixed sequence of kernels on fixed-shape
    tensors, which a CUDA graph can capture (``graphed_step.py``); ``batch`` comes from ``encode_for_unet``.
    """
    latents = batch["mean"].float()
    b = latents.shape[0]
    device = latents.device
    first = batch["first"].float() / 127.5 - 1.0  # exact: the frames were uint8
    keep = (torch.rand(b, generator=generator, device=device) >= config.cond_dropout).float()
    fps = torch.randint(4, 31, (b,), generator=generator, device=device).float()
    sigma = sample_sigmas(b, config, device, generator)
    return {
        "latents": latents,
        "pixels": clip_pixels(first),
        "keep": keep,
        "image_latent": batch["image_latent"].float(),
        "added_time_ids": torch.stack([fps - 1, batch["bucket"].float(), batch["aug"].float()], dim=1),
        "sigma": sigma,
        "noise": torch.randn(latents.shape, generator=generator, device=device),
    }


def unet_loss_on(models: dict, inputs: dict[str, torch.Tensor], config: TrainConfig) -> tuple[torch.Tensor, dict]:
    """SVD's EDM v-prediction loss with the pipeline's conditioning, on ``draw_unet_inputs``' tensors.

    Conditioning is dropped together (``keep`` = 0: zero embedding and zero image latent, the
    pipeline's unconditional branch) so that classifier-free guidance works at inference.
    """
    unet, encoder = models["unet"], models["image_encoder"]
    latents, keep = inputs["latents"], inputs["keep"]
    b, f = latents.shape[:2]
    embeddings = encoder(inputs["pixels"]).image_embeds.unsqueeze(1) * keep.view(b, 1, 1)
    image_latents = (inputs["image_latent"] * keep.view(b, 1, 1, 1)).unsqueeze(1).expand(-1, f, -1, -1, -1)
    s = inputs["sigma"].view(b, 1, 1, 1, 1)
    noisy = latents + s * inputs["noise"]
    c_in, c_skip, c_out, c_noise = edm_preconditioning(s)
    model_input = torch.cat([c_in * noisy, image_latents], dim=2)
    out = unet(model_input, c_noise.flatten(), embeddings, inputs["added_time_ids"]).sample.float()
    target = (latents - c_skip * noisy) / c_out
    error = (out - target) ** 2
    loss = (motion_weights(latents, config) * error).mean()
    return loss, {"loss": loss.detach(), "unweighted_loss": error.mean().detach()}
