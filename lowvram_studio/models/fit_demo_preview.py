"""Refit the shipped demo model's live-preview projection against its current VAE weights:

    python -m lowvram_studio.models.fit_demo_preview

Run after retraining the demo weights (the studio refits a stale projection per session anyway, but
only this rewrites the shipped assets/demo-model/latent_rgb.json).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .demo import DEFAULT_WEIGHTS_DIR, build_demo_pipeline, demo_model_info
from .latent_rgb import FILE_NAME, fit_latent_rgb, fitting_images, save_latent_rgb

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Refit the demo model's projection against its current VAE weights and rewrite the shipped JSON."""
    parser = argparse.ArgumentParser(prog="python -m lowvram_studio.models.fit_demo_preview", description=main.__doc__)
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not demo_model_info().trained:
        logger.error("error: trained demo weights not found in %s; restore them first", DEFAULT_WEIGHTS_DIR)
        return 2
    vae = build_demo_pipeline(with_preview=False).vae
    projection = fit_latent_rgb(vae, fitting_images())
    path = save_latent_rgb(projection, DEFAULT_WEIGHTS_DIR / FILE_NAME)
    logger.info("wrote %s: VAE %s, RMSE %.4f on %d images in %.1f s", path, projection.vae_fingerprint,
                projection.fit["rmse"], projection.fit["images"], projection.fit["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
