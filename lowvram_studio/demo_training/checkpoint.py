"""Checkpoint files small enough to travel through the device's $OUT (< 16 MiB each, few files).

Weights go in fp32 (fp16 once frozen), AdamW moments in bf16 (half the bytes; a resume is close to,
not bit-identical with, an uninterrupted run), large state dicts split into shards.
"""

from __future__ import annotations

import base64
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MAX_FILE_BYTES = 15 * 2**20


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, name: str) -> None:
    for old in folder.glob(f"{name}-*.safetensors"):
        old.unlink()
    shard: dict[str, torch.Tensor] = {}
    size = 0
    index = 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > MAX_FILE_BYTES:
            save_file(shard, str(folder / f"{name}-{index:02d}.safetensors"))
            shard, size, index = {}, 0, index + 1
        shard[key] = t
        size += nbytes
    save_file(shard, str(folder / f"{name}-{index:02d}.safetensors"))


def load_sharded(folder: Path, name: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob(f"{name}-*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW moments in bf16, step counters in fp32, keyed by parameter index."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{index}.{key}"] = value.float() if key == "step" else value.to(torch.bfloat16)
    return out


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def rng_blob() -> dict[str, str]:
    blob = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        blob["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return blob


def restore_rng(blob: dict[str, str]) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(blob["cpu"]))
    if "cuda" in blob and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(blob["cuda"]))
