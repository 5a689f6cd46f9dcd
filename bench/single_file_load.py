"""Peak RAM and time of loading a single-file SVD-XT checkpoint (original Stability layout).

Builds full-size SVD-XT with random weights (seed 0), writes it as one original-layout safetensors
file (fp32, ~9 GB, like Stability's svd_xt.safetensors; and fp16), then loads each file in a fresh
subprocess and records that process's peak RSS (ru_maxrss) above its RSS after imports, against the
size of the loaded model. Target (issue 8): peak RAM <= 1.2x the loaded model.
Peer: ``safetensors.torch.load_file`` + cast, the whole-state-dict way most loaders read a file first
(a lower bound for them: it builds no modules).

    python bench/single_file_load.py --out $OUT/single_file_load.json     # GPU machine, ~3 min
    python bench/single_file_load.py --smoke --out /tmp/sfl.json          # CPU, demo model, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "fp16": "float16"}
# (file dtype, target dtype, method)
MATRIX = [
    ("fp32", "fp16", "ours"),
    ("fp32", "fp32", "ours"),
    ("fp16", "fp16", "ours"),
    ("fp32", "fp16", "load_file"),
]


def _proc_status_mib(field: str) -> float | None:
    """A memory line of /proc/self/status in MiB (Linux; psutil may be missing on the GPU machine)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mib() -> float:
    rss = _proc_status_mib("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0), so imports do not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """VmHWM (peak resident set) from /proc, else ru_maxrss (then since process start)."""
    peak = _proc_status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def child(path: Path, target: str, method: str) -> dict:
    """Runs in a fresh process: load once, report RSS figures as JSON on stdout."""
    import torch
    from safetensors.torch import load_file

    from lowvram_studio.models.single_file import load_single_file

    dtype = getattr(torch, DTYPES[target])
    gc.collect()
    baseline = _rss_mib()
    peak_reset = _reset_peak_rss()
    start = time.perf_counter()
    if method == "ours":
        pipeline = load_single_file(path, dtype=dtype)
        tensors = [t for c in ("unet", "vae", "image_encoder") for t in getattr(pipeline, c).state_dict().values()]
    else:
        tensors = [t.to(dtype) for t in load_file(str(path)).values()]  # cast while the full dict is held
    seconds = time.perf_counter() - start
    model_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
    return {
        "baseline_rss_mib": baseline,
        "peak_rss_mib": _peak_rss_mib(),
        "peak_since_start": not peak_reset,
        "model_size_mib": model_bytes / 2**20,
        "seconds": seconds,
    }


def _build(smoke: bool):
    import torch

    if smoke:
        from lowvram_studio.models.demo import build_demo_pipeline

        return build_demo_pipeline()
    from lowvram_studio.models.svd_configs import build_svd_xt_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_svd_xt_pipeline(dtype=torch.float32, device=device, seed=0)


def write_files(folder: Path, smoke: bool) -> dict[str, Path]:
    import torch

    from lowvram_studio.models.single_file import save_original_checkpoint

    pipeline = _build(smoke)
    files = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        start = time.perf_counter()
        # Stability's files have no VAE quant conv; leave the random one out like they do.
        path = folder / f"svd_xt_{name}.safetensors"
        files[name] = save_original_checkpoint(pipeline, path, dtype, keep_quant_conv=False)
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s", flush=True)
    del pipeline
    gc.collect()
    return files


def _run_child(path: Path, target: str, method: str) -> dict:
    script = str(Path(__file__).resolve())
    command = [sys.executable, script, "--child", str(path), "--target", target, "--method", method]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"child {command} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _env() -> dict:
    import diffusers
    import safetensors
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "safetensors": safetensors.__version__,
        "cpu_count": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run(smoke: bool, folder: Path) -> list[dict]:
    files = write_files(folder, smoke)
    rows = []
    for file_dtype, target, method in MATRIX:
        path = files[file_dtype]
        figures = _run_child(path, target, method)
        added = figures["peak_rss_mib"] - figures["baseline_rss_mib"]
        rows.append(
            {
                "case": "demo" if smoke else "svd_xt",
                "config": f"{'ours' if method == 'ours' else 'peer-load_file'} {file_dtype}-file->{target}",
                "file_dtype": file_dtype,
                "target_dtype": target,
                "method": method,
                "file_size_mib": round(path.stat().st_size / 2**20, 1),
                "model_size_mib": round(figures["model_size_mib"], 1),
                "baseline_rss_mib": round(figures["baseline_rss_mib"], 1),
                "peak_rss_mib": round(figures["peak_rss_mib"], 1),
                "peak_ram_mib": round(added, 1),
                "ratio": round(added / figures["model_size_mib"], 3),
                "within_1_2x": added <= 1.2 * figures["model_size_mib"],
                "peak_includes_imports": figures["peak_since_start"],
                "seconds": round(figures["seconds"], 2),
                "read_gib_per_s": round(path.stat().st_size / 2**30 / figures["seconds"], 2),
            }
        )
        model = figures["model_size_mib"]
        print(f"{rows[-1]['config']}: peak +{added:.0f} MiB, model {model:.0f} MiB, {figures['seconds']:.1f} s", flush=True)
    return rows


COLUMNS = (
    "config", "file_size_mib", "model_size_mib", "peak_ram_mib", "ratio", "baseline_rss_mib", "seconds", "read_gib_per_s"
)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    note = (
        "\npeak_ram_mib = peak RSS (VmHWM, reset after imports) of a fresh process minus its RSS after imports; "
        "ratio = peak_ram / loaded model size (target <= 1.2). Page cache warm (files just written). "
        "About 25-40 MiB are fixed (module objects, lazy imports, the 16 MiB cast buffer), so --smoke ratios "
        "of the 10 MiB demo model check the script, not the bound.\n"
    )
    return "\n".join(lines) + "\n" + note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = REPO / "bench" / "results" / f"single_file_load_{time.strftime('%Y%m%d')}.json"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--smoke", action="store_true", help="demo model on the CPU: checks the script in seconds")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the checkpoints (default: a temp dir)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--target", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=("ours", "load_file"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.child:
        print(json.dumps(child(args.child, args.target, args.method)))
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="lowvram_single_file_") as tmp:
        rows = run(args.smoke, Path(tmp))
    report = {"env": _env(), "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(rows)
    args.out.with_suffix(".md").write_text(f"# single_file_load\n\n`{report['command']}`\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
