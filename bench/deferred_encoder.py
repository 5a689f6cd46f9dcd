"""RAM and time of a Wan run whose text encoder stays on disk when the prompt cache holds its texts: a Wan
folder with the full-size UMT5-XXL encoder (5.68 B parameters, bf16, zero-filled: 11.4 GB of files) beside
a toy transformer and VAE, run twice through the CLI with the same prompts, each run in a fresh process
(the CLI's case). Reports each process's peak RSS (loading included), the record's peak RAM per phase,
where the embeddings came from and the wall time. About 12 GB of RAM and 12 GB of disk.

    python bench/deferred_encoder.py --out bench/results/deferred_encoder_YYYYMMDD.json
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
CHILD = """
import json, resource, sys, time
from lowvram_studio.cli import main
started = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - started,
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
PROMPT, NEGATIVE = "a red ball moves left slowly", "still scene"


def build_folder(folder: Path) -> None:
    """The toy Wan pipeline with Wan's full-size text encoder in its place, saved as a diffusers folder."""
    from prompt_cache import full_size_encoder

    from lowvram_studio.models.wan_toy import build_toy_wan_pipeline

    pipeline = build_toy_wan_pipeline(text_dim=4096)
    pipeline.text_encoder = full_size_encoder(24)
    pipeline.save_pretrained(folder)


def run_cli(folder: Path, out: Path, data_dir: Path) -> dict:
    argv = ["generate", "--image", str(ROOT / "assets" / "ball_and_box.png"), "--out", str(out), "--model",
            str(folder), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--frames", "9", "--width", "64",
            "--height", "64", "--steps", "2", "--device", "cpu", "--encoder-dtype", "bf16"]
    env = {**os.environ, "LOWVRAM_STUDIO_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    record = json.loads(out.with_suffix(".json").read_text())
    return {**measured, "ram_peak_by_phase_mib": record["results"]["ram_peak_by_phase_mib"],
            "prompt_embeddings": record["info"]["prompt_embeddings"], "text_encoder": record["info"]["text_encoder"],
            "phase_seconds": record["phase_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(f"bench/results/deferred_encoder_{time.strftime('%Y%m%d')}.json"))
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the child that writes the folder
    args = parser.parse_args()
    if args.build:
        build_folder(args.build)
        return
    rows = []
    with tempfile.TemporaryDirectory() as work:
        folder, data_dir = Path(work) / "wan-umt5-xxl", Path(work) / "user-data"
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build", str(folder)], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        build_seconds = time.perf_counter() - started
        encoder_bytes = sum(p.stat().st_size for p in (folder / "text_encoder").glob("*.safetensors"))
        for label in ("first run: prompts not cached", "same prompts again"):
            rows.append({"case": label, **run_cli(folder, Path(work) / f"run{len(rows)}.mp4", data_dir)})
    report = new_report(encoder_file_bytes=encoder_bytes, build_seconds=round(build_seconds, 1), rows=rows)
    table = [
        f"Wan folder with the full-size UMT5-XXL text encoder ({encoder_bytes / 2**30:.1f} GiB of bf16 files) and a "
        "toy transformer/VAE; 9 frames at 64x64, 2 steps on the CPU, `--encoder-dtype bf16`; each run a fresh CLI "
        "process.",
        "",
        "| case | process peak RSS (MiB) | peak RSS in encode (MiB) | encode s | process s | text encoder |",
        "|---|---:|---:|---:|---:|---|",
        *[f"| {r['case']} | {r['max_rss_mib']:.0f} | {r['ram_peak_by_phase_mib'].get('encode image', 0):.0f} | "
          f"{r['phase_seconds'].get('encode image', 0):.2f} | {r['seconds']:.1f} | {r['text_encoder']} |"
          for r in rows],
    ]
    write_report(args.out, "Wan text encoder left on disk while the prompt cache holds the prompts", report, table)


if __name__ == "__main__":
    main()
