"""What the prompt-embedding cache saves: Wan's full-size UMT5-XXL text encoder (bf16, weights zero-filled:
the same memory and arithmetic as the real one) encoding a prompt and a negative prompt through
``WanFamily``'s own encode path, first with an empty cache (encoder runs, entries stored), then again
(fingerprint + read). Runs on the CPU (or ``--device cuda``); about 12 GB of RAM at full size.

    python bench/prompt_cache.py --out bench/results/prompt_cache_YYYYMMDD.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import new_report, write_report
from transformers import UMT5Config, UMT5EncoderModel

from lowvram_studio.engine.fingerprint import weights_fingerprint
from lowvram_studio.engine.prompt_cache import PromptCache
from lowvram_studio.engine.wan import WanFamily, WanRequest
from lowvram_studio.models.wan_configs import UMT5_XXL
from lowvram_studio.models.wan_toy import build_toy_wan_pipeline

PROMPT = "a red ball moves left slowly and the background is still"
NEGATIVE = "still scene"


def full_size_encoder(layers: int) -> UMT5EncoderModel:
    """bf16 weights without random init (zero-filled): building 5.7 B random values would take minutes."""
    with torch.device("meta"):
        encoder = UMT5EncoderModel(UMT5Config(**{**UMT5_XXL, "num_layers": layers})).to(torch.bfloat16)
    encoder = encoder.to_empty(device="cpu")
    encoder.tie_weights()  # to_empty gives the shared embedding and the stack's embed_tokens a tensor each
    with torch.no_grad():
        for tensor in encoder.state_dict().values():
            tensor.zero_()
    return encoder.eval()


def timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(f"bench/results/prompt_cache_{time.strftime('%Y%m%d')}.json"))
    parser.add_argument("--layers", type=int, default=24, help="encoder layers (24: UMT5-XXL)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    pipeline = build_toy_wan_pipeline()  # its tokenizer and scheduler; the text encoder is replaced
    pipeline.text_encoder, build_seconds = timed(lambda: full_size_encoder(args.layers))
    pipeline.text_encoder.to(device)
    parameters = sum(p.numel() for p in pipeline.text_encoder.parameters())
    request = WanRequest(width=64, height=64, num_frames=9, num_inference_steps=1, prompt=PROMPT,
                         negative_prompt=NEGATIVE, guidance_scale=5.0, max_sequence_length=512)
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        _, cold_fingerprint = timed(lambda: weights_fingerprint(pipeline.text_encoder))
        _, warm_fingerprint = timed(lambda: weights_fingerprint(pipeline.text_encoder))
        for label in ("empty cache: encoder runs, entries stored", "same prompts again: from the cache"):
            family = WanFamily(pipeline, prompt_cache=PromptCache(folder))
            (positive, _, sources), seconds = timed(lambda: family._prompt_embeddings(request, device))
            rows.append({"case": label, "seconds": round(seconds, 3), "sources": sources})
        entry_bytes = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) // 2
    report = new_report(
        encoder={"class": "UMT5EncoderModel", "layers": args.layers, "parameters": parameters, "dtype": "bfloat16",
                 "device": str(device), "build_seconds": round(build_seconds, 1)},
        max_sequence_length=512, embedding_shape=list(positive.shape), entry_bytes=entry_bytes,
        fingerprint_seconds={"first": round(cold_fingerprint, 3), "remembered": round(warm_fingerprint, 6)},
        rows=rows, hit_in_a_new_process_seconds=round(rows[1]["seconds"] + cold_fingerprint, 3),
    )
    table = [
        f"UMT5 encoder, {args.layers} layers, {parameters / 1e9:.2f} B parameters, bf16 on {device}; "
        f"prompt + negative prompt at 512 tokens; one entry {entry_bytes / 2**20:.1f} MiB. "
        f"Weight fingerprint: {cold_fingerprint:.2f} s the first time in a process, "
        f"{warm_fingerprint * 1e3:.2f} ms when remembered.",
        "",
        "| case | seconds |",
        "|---|---:|",
        *[f"| {row['case']} | {row['seconds']:.3f} |" for row in rows],
        "",
        f"A hit in a new process (the CLI's case) adds the first fingerprint: "
        f"{report['hit_in_a_new_process_seconds']:.2f} s in all, against {rows[0]['seconds']:.1f} s with the encoder; "
        "the encoder's weights are never moved or run.",
    ]
    write_report(args.out, "Prompt-embedding cache: Wan's UMT5-XXL encoder, miss vs hit", report, table)


if __name__ == "__main__":
    main()
