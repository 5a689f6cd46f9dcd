"""What every benchmark writes: the JSON report (env stamp, exact command, rows) and a markdown table beside it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowvram_studio.sysinfo import collect_env  # noqa: E402


def device_run_arguments(parser: argparse.ArgumentParser, name: str, steps: int,
                         model_dir: str = "/tmp/svd-xt-random") -> None:
    """The flags every device benchmark takes: where its JSON goes, the full-size model folder it builds once
    (bench/budgets.py ``build_model``), steps per row and the deadline after which it starts no row."""
    parser.add_argument("--out", type=Path, default=Path(f"bench/results/{name}_{time.strftime('%Y%m%d')}.json"))
    parser.add_argument("--model-dir", type=Path, default=Path(model_dir))
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--deadline", type=float, default=540.0, help="start no row after this many seconds")


def new_report(**fields: Any) -> dict[str, Any]:
    """A report stamped with this machine (GPU, driver, torch, diffusers) and the exact command line."""
    return {"env": collect_env(), "command": "python " + " ".join(sys.argv), **fields}


def write_report(out: Path, title: str, report: dict[str, Any], table: list[str]) -> None:
    """``out`` (JSON) and ``out.md`` (title, env stamp, command, table); prints the table last."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    env = report["env"]
    header = (f"# {title} ({time.strftime('%Y-%m-%d')})\n\nGPU {env.get('gpu')} (driver {env.get('driver')}), "
              f"torch {env.get('torch')}, diffusers {env.get('diffusers')}. Command: `{report['command']}`\n\n")
    out.with_suffix(".md").write_text(header + "\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))
