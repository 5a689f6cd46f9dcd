"""A pipeline component left on disk until a run needs it: Wan's UMT5-XXL text encoder (5.7 B parameters,
11 GB in bf16) is read only for a prompt the prompt cache does not hold, so a re-run with the same prompts
loads the Wan model with 11 GB less RAM and without the encoder's load time.

The cache needs the encoder's identity before reading it, so the files identify it: the class, its
config.json, and of each safetensors file its size, its header (every tensor's name, dtype, shape and
offsets) and 16 evenly spaced 64 KiB blocks of its data — about 1 MiB read, where a retrained or
re-quantised checkpoint differs in its header or in every block. Written here: diffusers and
transformers load a component whole or not at all.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from ..engine.components import INPUT_EMBEDDING_NAMES
from .errors import ModelError
from .safetensors_file import SafetensorsHeader, SingleFileError, read_header

BLOCKS_PER_FILE = 16
BLOCK_BYTES = 64 * 1024
# transformers' variant names: model.fp16.safetensors, model.fp16-00001-of-00002.safetensors
FP16_VARIANT = re.compile(r"\.fp16(-\d+-of-\d+)?\.safetensors$")


def files_fingerprint(class_name: str, config: bytes, headers: list[SafetensorsHeader]) -> str:
    """The class, its config and, of each weight file, its size, header and sampled data blocks (module docstring)."""
    digest = hashlib.sha256(class_name.encode())
    digest.update(config)
    for header in headers:
        digest.update(f"{header.path.name}:{header.file_size}:{sorted(header.metadata.items())}".encode())
        entries = sorted(header.entries.items())
        digest.update(repr([(name, str(e.dtype), e.shape, e.begin, e.end) for name, e in entries]).encode())
        data_start = min((e.begin for e in header.entries.values()), default=header.file_size)
        stride = max((header.file_size - data_start) // BLOCKS_PER_FILE, 1)
        with header.path.open("rb") as handle:
            for offset in range(data_start, header.file_size, stride):
                handle.seek(offset)
                digest.update(handle.read(BLOCK_BYTES))
    return f"{class_name}:files-sha256:{digest.hexdigest()[:32]}"


@dataclass
class DeferredTextEncoder:
    """The pipeline folder's ``text_encoder/``: a ``transformers`` class (``UMT5EncoderModel``) read on demand."""

    folder: Path
    class_name: str

    def variant(self) -> str | None:
        """"fp16" for a folder that holds only fp16-variant weight files (saved with ``variant="fp16"``): they are
        the ones to read; beside plain files they are a second copy, read neither for the identity nor the load."""
        files = list(self.folder.glob("*.safetensors"))
        return "fp16" if files and all(FP16_VARIANT.search(path.name) for path in files) else None

    def weight_files(self) -> list[Path]:
        variant = self.variant() is not None
        return sorted(path for path in self.folder.glob("*.safetensors")
                      if bool(FP16_VARIANT.search(path.name)) == variant)

    @functools.cached_property
    def headers(self) -> list[SafetensorsHeader]:
        """Each weight file's header, read once (validated: a truncated or foreign file raises ``ModelError``)."""
        try:
            return [read_header(path) for path in self.weight_files()]
        except SingleFileError as exc:
            raise ModelError(f"the text encoder in {self.folder} cannot be read: {exc}") from exc

    @functools.cached_property
    def _files_fingerprint(self) -> str:
        return files_fingerprint(self.class_name, (self.folder / "config.json").read_bytes(), self.headers)

    def fingerprint(self) -> str:
        return self._files_fingerprint

    def parameters(self) -> int:
        """Counted from the headers' shapes (a tied embedding is stored, and counted, once)."""
        return sum(math.prod(entry.shape) for header in self.headers for entry in header.entries.values())

    def largest_streamed_parameter(self) -> int:
        return max(math.prod(entry.shape) for header in self.headers for name, entry in header.entries.items()
                   if not name.endswith(INPUT_EMBEDDING_NAMES))

    def load(self, dtype: torch.dtype) -> torch.nn.Module:
        try:
            model = getattr(transformers, self.class_name).from_pretrained(
                self.folder, dtype=dtype, local_files_only=True, use_safetensors=True, variant=self.variant())
        except (OSError, ValueError, RuntimeError, TypeError, AttributeError) as exc:
            raise ModelError(f"the text encoder in {self.folder} could not be loaded ({exc}); the files may be "
                             "damaged, download them again") from exc
        return model.eval().requires_grad_(False)
