"""Where a demo-model UNet training step spends its time, and what a CUDA graph saves.

Builds the fine-tune's trainer from the shipped demo weights and measures, on the training device:
the data workers' clip rate, the VAE encode of a bank refresh, and the UNet step (forward, backward,
gradient clip, AdamW) per batch size, eager and replayed from a CUDA graph (``graphed_step.py``).
A step whose time does not grow with the batch is launch-bound. Last, the eager and graphed steps are
checked to compute the same thing: two trainers from the same weights take the same batches and the
loss and weights are compared after each step (a second eager run gives the eager run's own spread).
Batches stop at 128: at 256 clips the temporal attention gets 65 536 sequences (clips x 16 x 16
latent positions) and SDPA's kernel launch fails ("invalid argument", seen on the H200).

    python bench/demo_train_step.py --out $OUT/demo_train_step.json          # H100, ~2 minutes
    python bench/demo_train_step.py --smoke --out /tmp/demo_train_step.json  # CPU, tiny sizes, eager only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowvram_studio.demo_training.latent_bank import LatentBank  # noqa: E402
from lowvram_studio.demo_training.objective import draw_unet_inputs, encode_for_unet  # noqa: E402
from lowvram_studio.demo_training.train import Trainer  # noqa: E402
from lowvram_studio.demo_training.train_config import FINETUNE_DEFAULTS, TrainConfig, smoke_config  # noqa: E402
from lowvram_studio.demo_training.train_data import make_loader, to_model_range  # noqa: E402
from lowvram_studio.models.demo import demo_model_info  # noqa: E402

from common import new_report, write_report  # noqa: E402  (bench/common.py)


def synced() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def base_config(smoke: bool) -> TrainConfig:
    weights = str(demo_model_info().weights_dir)
    if smoke:
        return replace(smoke_config(), init_from=weights, vae_minutes=0.0, vae_steps=None)
    return replace(TrainConfig(), init_from=weights, **{**FINETUNE_DEFAULTS, "vae_minutes": 0.0})


def unet_trainer(config: TrainConfig, device: torch.device) -> Trainer:
    trainer = Trainer(config, Path(tempfile.mkdtemp()), device)
    trainer.skip_phase("vae")
    return trainer


def data_rows(config: TrainConfig, device: torch.device, seconds: float) -> tuple[list[dict], LatentBank]:
    """Clip rate of the data workers, and the encode of one refresh, while a bank fills."""
    loader = iter(make_loader(config, "unet", 0, config.bank_refresh))
    frames, buckets = next(loader)  # workers started
    trainer = unet_trainer(config, device)
    bank = LatentBank(config.bank_size)
    clips, encode_s, batches = 0, 0.0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or bank.size < 2 * config.unet_batch:
        frames, buckets = next(loader)
        begin = synced()
        with trainer.autocast:
            bank.add(encode_for_unet(trainer.models["vae"], to_model_range(frames, device), buckets, config, trainer.generator))
        encode_s += synced() - begin
        clips += frames.shape[0]
        batches += 1
    elapsed = time.perf_counter() - start
    return [
        {"part": "data", "config": f"{config.workers} workers, {config.bank_refresh} clips per fetch",
         "clips_per_s": clips / elapsed, "seconds": elapsed},
        {"part": "encode", "config": f"VAE encode of {config.bank_refresh} clips", "ms": 1000 * encode_s / batches},
    ], bank


def step_row(config: TrainConfig, device: torch.device, bank: LatentBank, batch: int, graphed: bool, steps: int) -> dict:
    trainer = unet_trainer(replace(config, unet_batch=batch, cuda_graph=graphed), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    inputs = [draw_unet_inputs(bank.sample(batch, trainer.generator), config, trainer.generator) for _ in range(4)]
    for i in range(5):  # eager warm-up and, graphed, the capture
        trainer.train_step(inputs[i % 4])
    start = synced()
    for i in range(steps):
        stats = trainer.train_step(inputs[i % 4])
    seconds = (synced() - start) / steps
    return {"part": "unet step", "config": f"batch {batch}, {'CUDA graph' if graphed else 'eager'}", "batch": batch,
            "graphed": graphed, "ms": 1000 * seconds, "clips_per_s": batch / seconds, "loss": float(stats["loss"]),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def equivalence_row(config: TrainConfig, device: torch.device, bank: LatentBank, batch: int, steps: int) -> dict:
    """Same weights, same batches: does the graphed step follow the eager one as closely as a second eager run does?"""
    runs = {name: unet_trainer(replace(config, unet_batch=batch, cuda_graph=name == "graphed"), device)
            for name in ("eager", "eager again", "graphed")}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    weight_diff: dict[str, list[float]] = {"eager again": [], "graphed": []}
    reference = runs["eager"]
    for _ in range(steps):
        inputs = draw_unet_inputs(bank.sample(batch, reference.generator), config, reference.generator)
        for name, trainer in runs.items():
            trainer._set_learning_rate("unet")
            losses[name].append(float(trainer.train_step(inputs)["loss"]))
        for name in weight_diff:
            weight_diff[name].append(max(
                float((p - q).abs().max())
                for p, q in zip(reference.models["unet"].parameters(), runs[name].models["unet"].parameters())
            ))
    return {"part": "equivalence", "config": f"batch {batch}, {steps} steps: eager, eager again, graphed",
            "losses": losses, "max_weight_diff_per_step": weight_diff}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, eager only")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    config = base_config(args.smoke)
    report = new_report(rows=[])
    rows, bank = data_rows(config, device, seconds=2 if args.smoke else 20)
    report["rows"] += rows
    plan = [(2, False)] if args.smoke else [(16, False), (64, False), (128, False), (16, True), (64, True), (128, True)]
    for batch, graphed in plan:
        report["rows"].append(step_row(config, device, bank, batch, graphed, steps=3 if args.smoke else 30))
        print(report["rows"][-1], flush=True)
        write_report(args.out, "Demo-model UNet training step", report, table_lines(report))  # kept if a later row fails
    if not args.smoke:
        report["rows"].append(equivalence_row(config, device, bank, 64, steps=8))
    write_report(args.out, "Demo-model UNet training step", report, table_lines(report))
    return 0


def table_lines(report: dict) -> list[str]:
    table = ["| part | configuration | ms | clips/s | peak GiB |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        if row["part"] == "equivalence":
            diffs = {name: max(d) for name, d in row["max_weight_diff_per_step"].items()}
            table.append(f"| equivalence | {row['config']} | max weight diff from eager: {diffs} | | |")
            continue
        ms = f"{row['ms']:.1f}" if "ms" in row else ""
        rate = f"{row['clips_per_s']:.0f}" if "clips_per_s" in row else ""
        peak = f"{row['peak_gib']:.2f}" if row.get("peak_gib") else ""
        table.append(f"| {row['part']} | {row['config']} | {ms} | {rate} | {peak} |")
    return table


if __name__ == "__main__":
    raise SystemExit(main())
