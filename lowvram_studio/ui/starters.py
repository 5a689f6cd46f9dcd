"""Starter presets per GPU: one pick sets the VRAM budget and the settings a card of that size starts from.

A new user knows their card, not what "decode chunk" means. Each starter names a card class and sets the
budget of that size plus a size, length and precision that card runs in reasonable time (the write-up:
a GTX 1060 6 GB ran 512x512 with FP16); the budget's plan then fills the memory savers as for any
budget pick, so a starter is a budget pick with sensible request settings, not a second planner.
"""

from __future__ import annotations

from typing import Any

_FP16 = {"unet_dtype": "fp16", "vae_dtype": True, "encoder_dtype": True, "half_compute": "auto", "device": "auto"}

STARTERS: dict[str, dict[str, Any]] = {
    "4 GB laptop (GTX 1650 / RTX 3050 4 GB)": {**_FP16, "vram_budget": "4 GB", "width": 448, "height": 256,
                                                "num_frames": 14, "num_inference_steps": 20},
    "GTX 1060 6 GB": {**_FP16, "vram_budget": "6 GB", "width": 512, "height": 512, "num_frames": 24,
                      "num_inference_steps": 20},
    "8 GB (RTX 3070 / 4060)": {**_FP16, "vram_budget": "8 GB", "width": 1024, "height": 576, "num_frames": 25,
                               "num_inference_steps": 25},
    "12 GB (RTX 3060 12 GB / 4070)": {**_FP16, "vram_budget": "12 GB", "width": 1024, "height": 576,
                                      "num_frames": 25, "num_inference_steps": 25},
    "24 GB (RTX 3090 / 4090)": {**_FP16, "vram_budget": "24 GB", "width": 1024, "height": 576, "num_frames": 25,
                                "num_inference_steps": 25},
    "No GPU: a quick look on the CPU": {"unet_dtype": "fp32", "vae_dtype": False, "encoder_dtype": False,
                                        "device": "cpu", "vram_budget": "Manual", "width": 128, "height": 128,
                                        "num_frames": 8, "num_inference_steps": 8},
}


def starter_form(name: str, form: dict[str, Any]) -> dict[str, Any]:
    """``form`` with starter ``name``'s budget and settings; an unknown name is refused with the choices."""
    if name not in STARTERS:
        raise ValueError(f"there is no starter preset {name!r}; pick one of: {', '.join(STARTERS)}")
    return {**form, **STARTERS[name]}
