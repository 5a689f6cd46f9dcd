"""What each RunSettings field means, said once: its label, help, unit, range, group, CLI flag, what it costs.

The CLI's flags and their help, the studio's labels, info texts and slider ranges, the list of lossy settings,
the queue's and the speed calibration's keys, and compare's "what to make" are all read from ``TABLE``
(issue #18 item 2), so a setting's meaning is edited in one place. A test checks that the table has exactly
one entry per RunSettings field.

Standard library only, as engine/options.py is (the settings file and the CLI's ``--help`` need no torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .engine.options import Precision

if TYPE_CHECKING:
    from .settings import RunSettings

# The groups, in the order the CLI's help and the DESIGN's §7 list them.
Group = Literal["make", "precision", "layer chunks", "placement", "decode", "windows", "pruning", "delivery"]
# What a setting changes about a run's time: "step" the seconds per denoise step (the speed calibration's key),
# "run" the run's time outside the steps (decode, encode, planning, interpolation), None nothing.
Cost = Literal["step", "run"] | None

LOSSY_MARK = " ⚠ lossy"
# Each group's heading (the CLI's --help sections)
GROUP_TITLES: dict[str, str] = {
    "make": "what to make",
    "precision": "precision (below fp32: lossy)",
    "layer chunks": "lossless layer chunks",
    "placement": "weight placement (lossless)",
    "decode": "VAE decode (lossy below all frames / with tiles)",
    "windows": "temporal windows (lossy)",
    "pruning": "static-frame pruning and step reuse (lossy)",
    "delivery": "VRAM budget, interpolation, live preview",
}


@dataclass(frozen=True)
class Setting:
    """One RunSettings field as the user meets it.

    ``lossy`` says when the field's value makes the output differ from the FP32 reference (DESIGN §3); None:
    never. ``aliases``: names the field had in an earlier release, still read from records, saved forms and the
    command line (``RENAMED``). ``slider``: (minimum, maximum, step) of the studio's slider, when it has one.
    """

    name: str
    group: Group
    label: str
    help: str
    flag: str | None = None
    unit: str = ""
    slider: tuple[float, float, float] | None = None
    lossy: Callable[[RunSettings], bool] | None = None
    cost: Cost = None
    aliases: tuple[str, ...] = ()
    marked: bool = True  # the label carries the lossy mark (the UNet's dropdown marks its choices instead)

    @property
    def old_flags(self) -> tuple[str, ...]:
        """The flags of the names this setting had before (``aliases``), still accepted."""
        return tuple(f"--{alias.replace('_', '-')}" for alias in self.aliases)

    @property
    def studio_label(self) -> str:
        """The label on the page: lossy settings carry ⚠."""
        return self.label + (LOSSY_MARK if self.lossy is not None and self.marked else "")


def _below_frames(name: str) -> Callable[[RunSettings], bool]:
    """Lossy when set to fewer frames than the clip has (0 and the frame count mean the whole clip)."""
    return lambda s: 0 < getattr(s, name) < s.num_frames


def _not_fp32(name: str) -> Callable[[RunSettings], bool]:
    return lambda s: getattr(s, name) != Precision.FP32


_ROWS = (
    # What to make
    Setting("height", "make", "Height", "height in pixels, a multiple of 64 for SVD, 32 for Wan2.2 TI2V "
            "(default: the model's)", "--height", "px", (64, 1024, 64)),
    Setting("width", "make", "Width", "width in pixels, a multiple of 64 for SVD, 32 for Wan2.2 TI2V "
            "(default: the model's)", "--width", "px", (64, 1024, 64)),
    Setting("num_frames", "make", "Frames", "frames to generate (default: the model's native count)", "--frames",
            "frames", (2, 128, 1)),
    Setting("num_inference_steps", "make", "Steps", "denoising steps", "--steps", "steps", (1, 100, 1)),
    Setting("seed", "make", "Seed", "random seed: the same seed and settings make the same video", "--seed"),
    Setting("fps", "make", "FPS", "frame rate: SVD's fps conditioning and the video's rate", "--fps", "fps",
            (1, 60, 1)),
    Setting("motion_bucket_id", "make", "Motion bucket", "SVD's motion bucket id: more = more motion",
            "--motion-bucket", "", (0, 1023, 1)),
    Setting("noise_aug_strength", "make", "Noise augmentation", "noise SVD adds to the conditioning image",
            "--noise-aug", "", (0, 1, 0.01)),
    Setting("min_guidance_scale", "make", "Min guidance (first frame)", "SVD's guidance at the first frame",
            "--min-guidance", "", (0, 20, 0.1)),
    Setting("max_guidance_scale", "make", "Max guidance (last frame; ≤ 1 = no CFG)",
            "SVD's guidance at the last frame; 1 or less turns guidance off (one UNet call per step)",
            "--max-guidance", "", (0, 20, 0.1), cost="step"),
    Setting("prompt", "make", "Prompt", "what the clip shows (Wan models steer by text; SVD by the image alone)",
            "--prompt"),
    Setting("negative_prompt", "make", "Negative prompt",
            "what to steer away from, e.g. 'blurry, still scene' (Wan models; empty: nothing)", "--negative-prompt"),
    Setting("guidance_scale", "make", "Guidance scale (≤ 1 = no CFG)",
            "how strongly Wan's prompt steers each step; 1 or less turns guidance off (one call per step; SVD "
            "uses the min/max guidance)", "--guidance", "", (0, 20, 0.1), cost="step"),
    Setting("device", "make", "Device", "where the model runs (auto: the CUDA GPU when there is one)", "--device"),
    # Precision
    Setting("unet_dtype", "precision", "UNet precision",
            "LOSSY: FP16 / BF16 halve the denoiser's weight and activation memory (FP16 is the closer to FP32; "
            "BF16 where FP16 overflows); FP8 storage halves the weights again, computed in FP16, slower",
            "--unet-dtype", lossy=_not_fp32("unet_dtype"), cost="step", marked=False),
    Setting("vae_dtype", "precision", "VAE FP16", "LOSSY: half the VAE's memory; may shift colours (keep fp32 "
            "unless memory is short)", "--vae-dtype", lossy=_not_fp32("vae_dtype"), cost="run"),
    Setting("encoder_dtype", "precision", "Image encoder FP16",
            "LOSSY (tiny): saves ~0.6 GB of CLIP weights, the embedding changes slightly (auto: fp32 for SVD's "
            "image encoder, bf16 for Wan's text encoder where the device has bf16)", "--encoder-dtype",
            lossy=_not_fp32("encoder_dtype"), cost="run"),
    Setting("half_compute", "precision", "FP16 weights compute in",
            "what FP16-stored weights compute in. auto: by this GPU's generation (FP32 on GTX 10xx / Volta and "
            "GTX 16xx, FP16 from RTX 20xx on); FP32 costs speed, not memory", "--half-compute", cost="step"),
    # Lossless layer chunks: each names the layers it cuts and its unit the axis it cuts along
    Setting("cfg_split", "layer chunks", "CFG split", "lossless: runs the two guidance branches one after the "
            "other: less memory, a little slower", "--cfg-split", cost="step"),
    Setting("spatial_chunk", "layer chunks", "Spatial-layer chunk (frames)",
            "lossless: frames per chunk in spatial layers (0 = all): less activation memory, slower",
            "--spatial-chunk", "frames", (0, 32, 1), cost="step"),
    Setting("temporal_chunk", "layer chunks", "Temporal-layer chunk (positions)",
            "lossless: spatial positions per chunk in temporal layers (0 = all): less activation memory",
            "--temporal-chunk", "positions", (0, 16384, 256), cost="step"),
    Setting("ff_chunk", "layer chunks", "Feed-forward chunk (tokens)",
            "lossless: tokens per feed-forward chunk (0 = off): less activation memory, slightly slower",
            "--ff-chunk", "tokens", (0, 16384, 256), cost="step"),
    # Placement
    Setting("offload", "placement", "Offload", "lossless: where weights wait while idle. model = whole parts on "
            "the GPU when used; stream = the denoiser's blocks stream in (least VRAM, slowest on fast GPUs)",
            "--offload", cost="step"),
    # Decode
    Setting("decode_frames", "decode", "Decode frames at once",
            "LOSSY below all frames: frames the VAE decodes per call (0 = all, unless on a GPU that alone would "
            "set the peak: then the fewest calls that do not; the frame count = all, always)", "--decode-frames",
            "frames", (0, 32, 1), _below_frames("decode_frames"), "run", aliases=("decode_chunk",)),
    Setting("vae_tile", "decode", "VAE tile (px)", "LOSSY: decode in tiles of this many pixels (0 = off); seams "
            "are blended", "--vae-tile", "px", (0, 1024, 64), lambda s: s.vae_tile > 0, "run"),
    # Temporal windows
    Setting("window_frames", "windows", "Frame window (frames)",
            "LOSSY: generate long videos in temporal windows of this many frames (0 = whole clip)",
            "--window-frames", "frames", (0, 64, 1), _below_frames("window_frames"), "step", aliases=("chunk_size",)),
    Setting("overlap", "windows", "Window overlap (frames)", "frames shared by neighbouring windows: more "
            "overlap, smoother joins, more compute", "--overlap", "frames", (0, 16, 1), cost="step"),
    Setting("window_blend", "windows", "Window blend", "how overlapping windows are mixed", "--window-blend"),
    # Static-frame pruning / feature reuse
    Setting("prune_threshold", "pruning", "Pruning threshold",
            "LOSSY: reuse work where frames barely change (0 = off); higher = faster, more artefacts. SVD: relative "
            "L1 of the pruning signal, Wan: diffusers FirstBlockCache, e.g. 0.05-0.2", "--prune-threshold", "",
            (0, 0.1, 0.001), lambda s: s.prune_threshold > 0, "step"),
    Setting("prune_mode", "pruning", "Pruning mode", "what pruning reuses: whole steps, static frames or both",
            "--prune-mode", cost="step"),
    Setting("extra", "pruning", "Finer knobs", "the finer pruning knobs (prune_step_signal, ...), in a settings "
            "file only", cost="step"),
    # Planning and delivery
    Setting("vram_budget", "delivery", "VRAM budget",
            "fills the memory settings with the planner's plan for this model, size and frames on a card of this "
            "size (auto: this GPU's free memory)", "--vram-budget", cost="run"),
    Setting("interpolate", "delivery", "Interpolation", "LOSSY: deliver 2x or 4x the frames by optical-flow "
            "interpolation between generated ones: N frames become (N-1)*k+1 (1 = off)", "--interpolate",
            lossy=lambda s: s.interpolate > 1, cost="run"),
    Setting("preview_every", "delivery", "Live preview every N steps (0 = off)",
            "a live latent preview every N denoise steps (0 = off): ~1 ms each, no VAE call, never changes the "
            "video", "--preview-every", "steps", (0, 10, 1)),
)

TABLE: dict[str, Setting] = {row.name: row for row in _ROWS}
# Old name -> today's, for records, saved forms and flags of the release before the rename (0.1.0): "chunk" had
# named three things (windows, layer chunks, decode calls); the layer chunks keep it. Accepted until 0.3.
RENAMED: dict[str, str] = {alias: row.name for row in _ROWS for alias in row.aliases}


def names(group: Group | None = None, cost: Cost | Literal["any"] = "any") -> tuple[str, ...]:
    """The fields of ``group`` (all groups when None) whose cost is ``cost`` ("any": whatever it is)."""
    return tuple(row.name for row in _ROWS
                 if (group is None or row.group == group) and (cost == "any" or row.cost == cost))


def lossy_names(settings: RunSettings) -> list[str]:
    """The fields whose values make these settings' output differ from the FP32 reference."""
    return [row.name for row in _ROWS if row.lossy is not None and row.lossy(settings)]


def renamed(data: dict, where: str) -> dict:
    """``data`` with each old name replaced by today's; ``ValueError`` when both spellings are given."""
    both = [f"{old} and {new}" for old, new in RENAMED.items() if old in data and new in data]
    if both:
        raise ValueError(f"{where} gives both {', '.join(both)}; {', '.join(RENAMED)} are the old names of "
                         f"{', '.join(RENAMED.values())}: keep only the new one")
    return {RENAMED.get(key, key): value for key, value in data.items()}
