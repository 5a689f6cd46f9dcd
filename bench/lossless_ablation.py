"""Is each lossless technique lossless on the GPU, and does our fp16 sampler match diffusers' fp16 pipeline?

Full-size SVD-XT architecture, random weights seeded 0, case A (512x512x24), fp16 UNet, 8 steps
(fidelity does not need 25), identical decode settings in every row so only the denoise differs.
Rows 1-9: our sampler with one technique at a time (and all together) against our own plain fp16
run — the reference run of DESIGN §3. Rows 10-11: our sampler with every component in fp16 against
``StableVideoDiffusionPipeline.__call__`` in fp16 with the same seed, the diffusers parity check.

    python bench/lossless_ablation.py --out $OUT/lossless_ablation.json     # H100, ~3 minutes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowvram_studio.engine.placement import clear_placement  # noqa: E402
from lowvram_studio.settings_adapter import generate  # noqa: E402
from lowvram_studio.models.svd_configs import build_svd_xt_pipeline  # noqa: E402
from lowvram_studio.monitor.report import psnr_ssim  # noqa: E402
from lowvram_studio.settings import RunSettings  # noqa: E402

from common import new_report, write_report  # noqa: E402  (bench/common.py)

TECHNIQUES = [
    ("plain", {}),
    ("plain-again", {}),
    ("cfg_split", {"cfg_split": True}),
    ("spatial_chunk=5", {"spatial_chunk": 5}),
    ("temporal_chunk=2304", {"temporal_chunk": 2304}),
    ("ff_chunk=4096", {"ff_chunk": 4096}),
    ("offload=model", {"offload": "model"}),
    ("offload=stream", {"offload": "stream"}),
    ("all lossless", {"cfg_split": True, "spatial_chunk": 5, "temporal_chunk": 2304, "ff_chunk": 4096, "offload": "model"}),
]


def test_image(size: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    return Image.fromarray((np.stack([x, y, 0.5 + 0 * x], -1) * 255).astype(np.uint8))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    image = test_image(512)
    base = RunSettings(height=512, width=512, num_frames=24, num_inference_steps=args.steps, unet_dtype="fp16", decode_frames=8)
    rows = []
    pipeline = build_svd_xt_pipeline(torch.float32, "cuda")
    reference = None
    for name, changes in TECHNIQUES:
        result = generate(pipeline, image, base.replace(**changes))
        reference = result.frames if reference is None else reference
        psnr, ssim = psnr_ssim(result.frames, reference)
        rows.append({"case": "A", "config": f"ours {name}", "reference": "ours plain fp16", "steps": args.steps,
                     "psnr_db": psnr, "ssim": ssim, "max_abs": float(np.abs(result.frames - reference).max()),
                     "seconds_per_step": result.seconds_per_step})
        print(rows[-1], flush=True)
        clear_placement(pipeline)
    del pipeline
    torch.cuda.empty_cache()

    half = base.replace(vae_dtype="fp16", encoder_dtype="fp16")
    pipeline = build_svd_xt_pipeline(torch.float16, "cuda")
    ours = generate(pipeline, image, half).frames
    theirs = pipeline(image, height=512, width=512, num_frames=24, num_inference_steps=args.steps, decode_chunk_size=8,
                      generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    psnr, ssim = psnr_ssim(ours, theirs)
    rows.append({"case": "A", "config": "ours plain, all components fp16", "reference": "diffusers pipeline fp16",
                 "steps": args.steps, "psnr_db": psnr, "ssim": ssim, "max_abs": float(np.abs(ours - theirs).max()),
                 "seconds_per_step": None})
    print(rows[-1], flush=True)

    report = new_report(rows=rows)
    lines = ["| case | config | reference | steps | PSNR dB | SSIM | max abs | s/step |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sps = f"{r['seconds_per_step']:.3f}" if r["seconds_per_step"] else "n/a"
        lines.append(f"| {r['case']} | {r['config']} | {r['reference']} | {r['steps']} | {r['psnr_db']:.2f} | "
                     f"{r['ssim']:.4f} | {r['max_abs']:.4f} | {sps} |")
    write_report(args.out, "Lossless ablation", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
