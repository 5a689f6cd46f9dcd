"""The device badge at the top of the page: which GPU the studio runs on and its VRAM, or that it is CPU only.

Read once from ``sysinfo.collect_env`` (the same facts a run record's ``env`` carries), so the badge
and the records agree; a GPU torch cannot use (``torch_gpu_problem``) is said plainly instead.
"""

from __future__ import annotations

import html
from typing import Any


def device_badge(env: dict[str, Any], torch_problem: str | None = None) -> str:
    """HTML for the badge: 'NVIDIA GeForce GTX 1060 6GB · 6.0 GB VRAM', or 'CPU (no usable CUDA GPU)'."""
    if env.get("gpu") and not torch_problem:
        vram = env.get("vram_total_mib")
        size = f" · {vram / 1024:.1f} GB VRAM" if vram else " · VRAM n/a"
        text, tone = f"GPU: {env['gpu']}{size}", "#1b5e20"
    else:
        why = "CUDA GPU unusable, see the banner" if torch_problem else "no CUDA GPU"
        text, tone = f"CPU ({why}): runs are slow; pick a small size", "#8d6e00"
    return (f'<span id="device-badge-text" style="border:1px solid {tone};color:{tone};border-radius:12px;'
            f'padding:2px 10px;font-size:0.9em;white-space:nowrap">{html.escape(text)}</span>')
