"""Text-encoder outputs kept on disk, so that a prompt seen before never runs (or moves) the encoder again.

Wan's UMT5-XXL text encoder has 5.7 B parameters (11 GB in bf16): on a small card it is offloaded or
streamed, and encoding one prompt means moving all of it through the GPU (or minutes on the CPU), while
its output is 4 MiB (512 tokens x 4096, bf16). Users re-run the same prompt and the same negative prompt
with other seeds and settings again and again, so each text's embedding is stored under a key of
everything it depends on:

- the text itself and ``max_sequence_length`` (embeddings are padded to it);
- the encoder's weights (``weights_fingerprint``), its class, storage and compute dtypes, the device kind;
- the tokenizer (``tokenizer_fingerprint``).

Another encoder, tokenizer or precision gives another key, never a stale embedding. Entries are
safetensors files written all-or-nothing; the folder is kept under a size cap, least recently used
first out. A cache that cannot be read or written costs only the encoder run, never the clip.

diffusers' pipelines accept ``prompt_embeds`` but keep nothing across runs, and no maintained library
caches them on disk: written here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .fingerprint import tokenizer_fingerprint, weights_fingerprint
from .precision import compute_dtype

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when what an entry holds changes; old entries then miss and age out
DEFAULT_MAX_BYTES = 1 << 30  # about 128 prompts of Wan's UMT5-XXL at bf16
TENSOR = "embeddings"
STALE_PARTIAL_SECONDS = 3600  # a write in progress takes well under a second


@dataclass(frozen=True)
class EncoderIdentity:
    """What an embedding depends on besides its text: the encoder, the tokenizer, how the encoder runs."""

    encoder: str
    tokenizer: str
    max_sequence_length: int

    @classmethod
    def of(cls, encoder: str, storage: torch.dtype, compute: torch.dtype, device: torch.device, tokenizer: Any,
           max_sequence_length: int) -> "EncoderIdentity":
        """``encoder``: the encoder's class and weights fingerprint; ``storage``/``compute``: how it runs."""
        return cls(f"{encoder}:{storage}:{compute}:{device.type}",
                   f"{type(tokenizer).__name__}:{tokenizer_fingerprint(tokenizer)}", max_sequence_length)

    @classmethod
    def of_module(cls, text_encoder: torch.nn.Module, tokenizer: Any, device: torch.device,
                  max_sequence_length: int) -> "EncoderIdentity":
        """The identity of a loaded encoder, from its weights and the dtypes it holds now."""
        encoder = f"{type(text_encoder).__name__}:{weights_fingerprint(text_encoder)}"
        storage = next(text_encoder.parameters()).dtype
        return cls.of(encoder, storage, compute_dtype(text_encoder), device, tokenizer, max_sequence_length)

    def key(self, text: str) -> str:
        parts = {"format": FORMAT, "encoder": self.encoder, "tokenizer": self.tokenizer,
                 "max_sequence_length": self.max_sequence_length, "text": text}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def mark_used(path: Path) -> None:
    """Stamp ``path`` with the clock's full resolution: the file system's own stamps tick every few ms,
    too coarse to order entries written or read in quick succession."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


class PromptCache:
    """A folder of text embeddings, one safetensors file per (text, ``EncoderIdentity``)."""

    def __init__(self, root: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root)
        self.max_bytes = max_bytes

    def path(self, identity: EncoderIdentity, text: str) -> Path:
        return self.root / f"{identity.key(text)}.safetensors"

    def load(self, identity: EncoderIdentity, text: str) -> torch.Tensor | None:
        """The stored (1, L, D) embedding of ``text``, or None. An unreadable or malformed entry is deleted
        (with a log line) and counts as a miss; a hit is marked recently used."""
        path = self.path(identity, text)
        try:
            embeddings = load_file(path)[TENSOR]
        except FileNotFoundError:
            return None
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            logger.warning("cached prompt embedding %s cannot be read (%s); encoding the prompt again", path, exc)
            path.unlink(missing_ok=True)
            return None
        if embeddings.dim() != 3 or embeddings.shape[:2] != (1, identity.max_sequence_length):
            logger.warning("cached prompt embedding %s has shape %s, not (1, %d, D); encoding the prompt again",
                           path, tuple(embeddings.shape), identity.max_sequence_length)
            path.unlink(missing_ok=True)
            return None
        try:
            mark_used(path)
        except OSError:
            pass  # a read-only cache still serves hits; only its eviction order goes stale
        return embeddings

    def save(self, identity: EncoderIdentity, text: str, embeddings: torch.Tensor) -> Path | None:
        """Store ``embeddings`` (1, L, D) for ``text``; None (with a log line) when the folder cannot take it."""
        path = self.path(identity, text)
        tensors = {TENSOR: embeddings.detach().to("cpu").contiguous()}
        metadata = {"text": text[:500], "encoder": identity.encoder, "tokenizer": identity.tokenizer}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial", dir=self.root)
            os.close(handle)
            try:  # all or nothing: a reader sees no entry or a whole one (the engine imports no app helpers)
                save_file(tensors, temp, metadata=metadata)
                os.replace(temp, path)
            finally:
                Path(temp).unlink(missing_ok=True)
            mark_used(path)
            self._evict(keep=path)
        except OSError as exc:
            logger.warning("cannot store the prompt embedding in %s (%s); the next run encodes it again",
                           self.root, exc)
            return None
        return path

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used entries until the folder is under ``max_bytes`` (``keep`` stays)."""
        entries = []
        for path in self.root.glob("*.safetensors"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # another process evicted it meanwhile
            entries.append((stat.st_mtime_ns, stat.st_size, path))
        for partial in self.root.glob(".*.partial"):  # left by a process killed mid-write
            with contextlib.suppress(OSError):
                if time.time() - partial.stat().st_mtime > STALE_PARTIAL_SECONDS:
                    partial.unlink()
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size
