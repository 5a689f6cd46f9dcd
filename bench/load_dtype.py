"""RAM of loading a Wan folder whose weights are bf16 files (as Wan-AI ships them): the full-size Wan2.2
TI2V-5B transformer (zero-filled bf16, 30 blocks of width 3072) beside the toy VAE and text encoder,
loaded in a fresh process each way: read into fp32 (what the loader did before: diffusers widens every
component to the dtype it is given) and by ``load_model`` (each component in the dtype its files hold).
Peak RSS (``ru_maxrss``) after loading and after reading every weight once (as a run does), and seconds. About 21 GB of RAM at full size (the fp32 way).

    python bench/load_dtype.py --out bench/results/load_dtype_YYYYMMDD.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import new_report, write_report

ROOT = Path(__file__).resolve().parents[1]
WAYS = {
    "read into fp32 (the loader before)": (
        "from diffusers import WanImageToVideoPipeline; import torch\n"
        "pipe = WanImageToVideoPipeline.from_pretrained(FOLDER, dtype=torch.float32, local_files_only=True)"),
    "load_model (each component in its files' dtype)": (
        "from lowvram_studio.models.load import load_model\npipe = load_model(FOLDER).pipeline"),
}
CHILD = """
import json, resource, time
FOLDER = {folder!r}
started = time.perf_counter()
{load}
seconds = time.perf_counter() - started
loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
for parameter in pipe.transformer.parameters():  # a run reads every weight: mapped pages become resident
    parameter.sum()
weight = pipe.transformer.blocks[0].ffn.net[0].proj.weight
print(json.dumps({{"seconds": seconds, "transformer_dtype": str(weight.dtype), "loaded_rss_mib": loaded_rss,
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def build_folder(folder: Path, layers: int) -> None:
    import torch
    from diffusers import WanTransformer3DModel

    from lowvram_studio.models.wan_configs import TI2V_5B_TRANSFORMER
    from lowvram_studio.models.wan_toy import build_toy_wan_pipeline

    pipeline = build_toy_wan_pipeline(text_dim=4096)
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**{**TI2V_5B_TRANSFORMER, "num_layers": layers})
    transformer = transformer.to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for tensor in transformer.state_dict().values():
            tensor.zero_()
    pipeline.transformer = transformer
    pipeline.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(f"bench/results/load_dtype_{time.strftime('%Y%m%d')}.json"))
    parser.add_argument("--layers", type=int, default=30, help="transformer blocks (30: TI2V-5B)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the child that writes the folder
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.build:
        build_folder(args.build, args.layers)
        return
    rows = []
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "wan-ti2v-5b-bf16"
        subprocess.run([sys.executable, __file__, "--build", str(folder), "--layers", str(args.layers)], check=True,
                       env=env)
        transformer_bytes = sum(p.stat().st_size for p in (folder / "transformer").glob("*.safetensors"))
        for label, load in WAYS.items():
            done = subprocess.run([sys.executable, "-c", CHILD.format(folder=str(folder), load=load)], env=env,
                                  capture_output=True, text=True, check=True)
            rows.append({"way": label, **json.loads(done.stdout.strip().splitlines()[-1])})
    report = new_report(layers=args.layers, transformer_file_bytes=transformer_bytes, rows=rows,
                        rss_ratio=round(rows[1]["max_rss_mib"] / rows[0]["max_rss_mib"], 3))
    table = [
        f"Wan2.2 TI2V-5B transformer, {args.layers} blocks, {transformer_bytes / 2**30:.2f} GiB of bf16 files (+ toy "
        "VAE and text encoder); each way in a fresh process on the CPU.",
        "",
        "| way | peak RSS after loading (MiB) | peak RSS after reading every weight (MiB) | load seconds | "
        "transformer dtype |",
        "|---|---:|---:|---:|---|",
        *[f"| {r['way']} | {r['loaded_rss_mib']:.0f} | {r['max_rss_mib']:.0f} | {r['seconds']:.1f} | "
          f"{r['transformer_dtype']} |" for r in rows],
        "",
        f"Peak RSS ratio after reading every weight, load_model / fp32: {report['rss_ratio']} (load_model's "
        "bf16 tensors map the files: their pages are the kernel's page cache, dropped and read again under "
        "pressure, where the fp32 copy is anonymous memory).",
    ]
    write_report(args.out, "Loading bf16 Wan files without widening them", report, table)


if __name__ == "__main__":
    main()
