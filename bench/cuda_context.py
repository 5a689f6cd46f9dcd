"""What the CUDA context and the math libraries cost before any weight is loaded (issue #20, item 4).

    python bench/cuda_context.py --out $OUT/cuda_context.json     # on the lent GPU

Every budget pays this first: on a 4 GB card it is a fifth of the memory. Each variant runs in its own
process (the context cannot be shrunk once made) with its environment set before torch starts, and
reads its own NVML process memory after each stage: the bare context (``torch.zeros(1)`` on the GPU),
the first fp16 matmul (cuBLAS / cuBLASLt handles and workspace), the first fp16 convolution (cuDNN),
the first scaled-dot-product attention (flash / memory-efficient kernels' modules), and a few UNet-size
kernels of each kind. ``torch_reserved`` is what the caching allocator holds; the rest of the process
figure is the context, loaded kernel modules and library handles, which no allocator setting frees.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import new_report, write_report  # noqa: E402

VARIANTS: dict[str, dict[str, str]] = {
    "default (lazy module loading)": {},
    "eager module loading": {"CUDA_MODULE_LOADING": "EAGER"},
    "cuBLAS workspace 1 x 4 MiB": {"CUBLAS_WORKSPACE_CONFIG": ":4096:1"},
    "cuBLAS workspace off": {"CUBLAS_WORKSPACE_CONFIG": ":0:0"},
    "cuDNN benchmark on": {"LOWVRAM_BENCH_CUDNN_BENCHMARK": "1"},
}

CHILD = r"""
import json, os, sys, torch, pynvml
pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByIndex(0)
def process_mib():
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if p.pid == os.getpid() and p.usedGpuMemory:
            return p.usedGpuMemory / 2**20
    return None
torch.backends.cudnn.benchmark = os.environ.get("LOWVRAM_BENCH_CUDNN_BENCHMARK") == "1"
out = {}
def stage(name):
    torch.cuda.synchronize()
    out[name] = {"process_mib": process_mib(), "torch_reserved_mib": torch.cuda.memory_reserved() / 2**20}
x = torch.zeros(1, device="cuda"); stage("context")
a = torch.randn(4096, 1280, device="cuda", dtype=torch.float16)
b = torch.randn(1280, 1280, device="cuda", dtype=torch.float16)
(a @ b).sum().item(); stage("after fp16 matmul")
img = torch.randn(2, 320, 64, 64, device="cuda", dtype=torch.float16)
conv = torch.nn.Conv2d(320, 320, 3, padding=1).cuda().half()
conv(img).sum().item(); stage("after fp16 conv")
q = torch.randn(2, 5, 4096, 64, device="cuda", dtype=torch.float16)
torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item(); stage("after attention")
gn = torch.nn.GroupNorm(32, 320).cuda().half()
torch.nn.functional.silu(gn(img)).sum().item(); stage("after groupnorm + silu")
del a, b, img, conv, q, gn
torch.cuda.empty_cache(); stage("after empty_cache")
print(json.dumps(out))
"""


def run_variant(name: str, env: dict[str, str]) -> dict[str, Any]:
    child_env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **env}  # as the app runs
    done = subprocess.run([sys.executable, "-c", CHILD], env=child_env, capture_output=True, text=True, timeout=180)
    row: dict[str, Any] = {"name": name, "env": env, "rc": done.returncode}
    if done.returncode == 0:
        row["stages"] = json.loads(done.stdout.strip().splitlines()[-1])
    else:
        row["error"] = done.stderr[-1500:]
    return row


def table(rows: list[dict[str, Any]]) -> list[str]:
    stage_names = next((list(r["stages"]) for r in rows if "stages" in r), [])
    lines = ["| variant | " + " | ".join(f"{s} MiB (torch reserved)" for s in stage_names) + " |",
             "|---|" + "---|" * len(stage_names)]
    for row in rows:
        if "stages" not in row:
            lines.append(f"| {row['name']} | failed: {row.get('error', '')[:120]} |")
            continue
        cells = [f"{v['process_mib']:.0f} ({v['torch_reserved_mib']:.0f})" if v["process_mib"] is not None else "-"
                 for v in row["stages"].values()]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    report = new_report(rows=rows)
    for name, env in VARIANTS.items():
        rows.append(run_variant(name, env))
        write_report(args.out, "CUDA context and library memory before any weight", report, table(rows))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
