"""Read safetensors checkpoint files safely and leanly: the header without the data, then tensors one by one.

One job, shared by every single-file loader (SVD in ``single_file.py``, Wan in ``wan_split_files.py``) and by
discovery: refuse pickle files, validate the header (offsets, truncation) before any tensor is read, and read each
tensor at its offset into its final tensor without a memory map (``single_file.py`` says what that saves).
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# Our own files (tests, benchmarks) record the hyperparameters that tensor shapes cannot tell.
METADATA_KEY = "lowvram_studio.configs"
MAX_HEADER_BYTES = 100 * 1024 * 1024

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

ProgressCallback = Callable[[int, int], None]
"""Called as ``on_progress(bytes_read, bytes_total)`` after every tensor."""


class SingleFileError(ValueError):
    """A checkpoint file that cannot be loaded; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# The safetensors header
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


@dataclass
class SafetensorsHeader:
    path: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    file_size: int

    def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors under ``prefix``, keyed without it."""
        return {k[len(prefix) :]: e.shape for k, e in self.entries.items() if k.startswith(prefix)}


def check_checkpoint_path(path: str | Path) -> Path:
    """Refuse pickle checkpoints and anything that is not an existing safetensors file."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SingleFileError(
            f"{path} is a pickle checkpoint ({path.suffix}): loading it runs whatever code it contains, so "
            "LowVRAM Studio refuses it; use the .safetensors version of the model (Stability publishes "
            "svd.safetensors / svd_xt.safetensors, ComfyUI's Wan files are .safetensors) or convert it once in a "
            "sandbox you trust"
        )
    if not path.is_file():
        raise SingleFileError(f"{path} does not exist or is not a file; check the path")
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise SingleFileError(
            f"{path} is not a .safetensors file; single-file models must be safetensors "
            "(e.g. svd_xt.safetensors), diffusers models a folder with model_index.json"
        )
    return path


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file without touching the tensor data.

    safetensors' Python API exposes no tensor offsets, so the 8-byte length + JSON header is parsed
    here (format: https://github.com/huggingface/safetensors#format); ``safe_open`` validates it too.
    """
    path = Path(path)
    file_size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise SingleFileError(f"{path} is empty or truncated ({file_size} bytes); download it again")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise SingleFileError(
                f"{path} is not a valid safetensors file (header length {header_len} bytes in a "
                f"{file_size}-byte file): it is truncated or not safetensors; download it again"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SingleFileError(f"{path} has a corrupt safetensors header ({exc}); download it again") from exc
    if not isinstance(header, dict):
        raise SingleFileError(f"{path} has a corrupt safetensors header (not a JSON object); download it again")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    try:
        for key, info in header.items():
            begin, end = info["data_offsets"]
            shape = tuple(int(s) for s in info["shape"])
            entries[key] = TensorEntry(_SAFETENSORS_DTYPES[info["dtype"]], shape, data_start + begin, data_start + end)
    except (KeyError, TypeError, ValueError) as exc:
        raise SingleFileError(
            f"{path} has a corrupt safetensors header near {key!r} ({exc!r}); download it again"
        ) from exc
    data_end = max((e.end for e in entries.values()), default=data_start)
    if data_end > file_size:
        raise SingleFileError(
            f"{path} is truncated: its header describes {data_end / 2**30:.2f} GiB but the file has "
            f"{file_size / 2**30:.2f} GiB (an interrupted download?); download it again"
        )
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as exc:
        raise SingleFileError(f"{path} is not a valid safetensors file ({exc}); download it again") from exc
    return SafetensorsHeader(path, entries, {str(k): str(v) for k, v in metadata.items()}, file_size)


def narrowest_stored(headers: Iterable[SafetensorsHeader], wanted: torch.dtype) -> torch.dtype:
    """``wanted``, or the narrower floating dtype most of the files' bytes are stored in (reading bf16 files into
    fp32 doubles their RAM for bits they never had). fp8 weights are dequantized when read, so they do not count."""
    stored: dict[torch.dtype, int] = {}
    for header in headers:
        for entry in header.entries.values():
            if entry.dtype.is_floating_point and entry.dtype.itemsize > 1:
                stored[entry.dtype] = stored.get(entry.dtype, 0) + entry.end - entry.begin
    if not stored:
        return wanted
    most = max(stored, key=stored.get)
    return most if most.itemsize < wanted.itemsize else wanted


def recorded_configs(header: SafetensorsHeader) -> dict[str, dict]:
    """The hyperparameters our own files (tests, benchmarks) record under METADATA_KEY, by component."""
    text = header.metadata.get(METADATA_KEY)
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        logger.warning("%s: ignoring unreadable %s metadata", header.path, METADATA_KEY)
        return {}


# ---------------------------------------------------------------------------------------------
# Reading the tensors
# ---------------------------------------------------------------------------------------------


class TensorReader:
    """Reads tensors at their offsets straight into their final, target-dtype tensors.

    Plain reads instead of a memory map keep the file's pages out of the process's resident memory,
    and a cast goes through one small reused staging buffer, so nothing is allocated and freed per
    tensor (freed buffers fragment the C heap, which then cannot shrink): peak RAM is the model
    plus the staging buffer.
    """

    STAGING_BYTES = 16 * 2**20

    def __init__(self, header: SafetensorsHeader, total: int, on_progress: ProgressCallback | None):
        self.header = header
        self.file = header.path.open("rb", buffering=0)
        self.staging: torch.Tensor | None = None  # allocated on the first cast
        self.done = 0
        self.total = total
        self.on_progress = on_progress

    def _read_bytes(self, offset: int, target: torch.Tensor, key: str) -> None:
        view = memoryview(target.numpy())
        self.file.seek(offset)
        got = 0
        while got < len(view):
            n = self.file.readinto(view[got:])
            if not n:
                raise SingleFileError(f"{self.header.path} ended early while reading {key}; download it again")
            got += n

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        entry = self.header.entries[key]
        target_dtype = dtype if entry.dtype.is_floating_point else entry.dtype
        out = torch.empty(entry.shape, dtype=target_dtype)
        flat = out.reshape(-1)
        if target_dtype == entry.dtype:
            self._read_bytes(entry.begin, flat.view(torch.uint8), key)
        else:
            if self.staging is None:
                self.staging = torch.empty(self.STAGING_BYTES, dtype=torch.uint8)
            itemsize = entry.dtype.itemsize
            step = self.STAGING_BYTES // itemsize
            for start in range(0, flat.numel(), step):
                count = min(step, flat.numel() - start)
                chunk = self.staging[: count * itemsize]
                self._read_bytes(entry.begin + start * itemsize, chunk, key)
                flat[start : start + count].copy_(chunk.view(entry.dtype))
        self.done += entry.end - entry.begin
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)
        return out

    def close(self) -> None:
        self.file.close()


def tqdm_progress(description: str = "Loading") -> ProgressCallback:
    """A progress callback drawing a tqdm bar in bytes (for the CLI)."""
    from tqdm.auto import tqdm  # only the CLI needs it

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update

