"""lowvram-studio generate | compare | info | models | ui — a thin shell over the engine.

Every failure the user can act on ends with one line ``error: <what is wrong>; <what to do>`` on stderr
and an exit code saying which kind it was (``EXIT_CODES``); a traceback (exit 1) is a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__

EXIT_BAD_INPUT = 2  # the input cannot work: fix the command, a file it names, or the machine's setup
EXIT_RUN_FAILED = 3  # valid input, but the run failed on this hardware: out of memory, NaN / inf values
EXIT_CANCELLED = 130  # stopped by the user (Ctrl+C), as shells report SIGINT
EXIT_CODES = (
    "exit codes: 0 done, 1 a bug (please report it), 2 bad input (the error line says what to change), "
    "3 the run failed on this hardware (out of memory, or NaN / inf values: try the settings the error "
    "line names), 130 stopped with Ctrl+C"
)
# A file or folder name has at most 255 bytes on ext4, NTFS (UTF-16 units) and APFS. --out's name leaves
# room for the ".NAME.PID.RANDOM.partial.json" temporaries written beside it.
NAME_MAX_BYTES = 255
OUT_NAME_MAX_BYTES = 200

class UserError(Exception):
    """Anything the user can fix; printed as one ``error:`` line."""


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunSettings field the table gives a flag (settings_table.TABLE), with its help; a renamed
    field's old flag is accepted too, hidden from the help (``_warn_old_flags`` says the new name)."""
    from enum import Enum

    from .settings import VRAM_BUDGETS, field_types
    from .settings_table import GROUP_TITLES, TABLE

    groups = {name: parser.add_argument_group(title) for name, title in GROUP_TITLES.items()}
    for row in TABLE.values():
        if row.flag is None:
            continue
        group = groups[row.group]
        kind = field_types()[row.name]
        if kind is bool:
            group.add_argument(row.flag, dest=row.name, action="store_true", default=None, help=row.help)
            continue
        values = ([e.value for e in kind] if issubclass(kind, Enum)
                  else [*VRAM_BUDGETS, "e.g. 5GB"] if row.name == "vram_budget" else [])
        flag_type = str if issubclass(kind, Enum) else kind
        group.add_argument(row.flag, dest=row.name, type=flag_type, default=None,
                           help=f"{row.help} ({' | '.join(values)})" if values else row.help)
        for old in row.old_flags:
            group.add_argument(old, dest=row.name, type=flag_type, default=None, help=argparse.SUPPRESS)
    groups["make"].add_argument("--settings", type=Path, help="start from a settings JSON file (flags override it)")


def _warn_old_flags(argv: Sequence[str]) -> None:
    """A note on stderr for each flag of a renamed setting, so scripts move before the old names go."""
    from .settings_table import TABLE

    for row in TABLE.values():
        for flag in row.old_flags:
            if any(arg == flag or arg.startswith(flag + "=") for arg in argv):
                print(f"note: {flag} is now {row.flag}; the old name is accepted until 0.3", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowvram-studio", description="Stable Video Diffusion on small GPUs.",
                                     epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="turn an image into a video", epilog=EXIT_CODES)
    gen.add_argument("--image", type=Path, help="input image (PNG, JPEG, WebP, ...); required unless --from-record "
                     "finds the run's image")
    gen.add_argument("--out", type=Path, help="output video, e.g. out.mp4 (OUT.json is written beside it); "
                     "with --from-record the default is RECORD-again.mp4 beside the record")
    gen.add_argument("--model", default=None,
                     help="demo | a diffusers SVD or Wan folder | svd_xt.safetensors | ComfyUI's Wan diffusion_models file (or its ComfyUI folder) | HF id in the cache (default: demo)")
    gen.add_argument("--gif", action="store_true", help="also write OUT.gif")
    gen.add_argument("--from-record", type=Path, default=None, metavar="OUT.json",
                     help="use these settings again: restore the model, every setting and the seed (and the input "
                          "image, if it is still there) of an earlier run from its .json record or its .mp4; "
                          "--image, --model, --settings and setting flags given together override the record")
    _add_setting_flags(gen)

    cmp = sub.add_parser("compare", help="run FP32, FP16 and FP16 + your optimizations side by side",
                         epilog=EXIT_CODES)
    cmp.add_argument("--image", required=True, type=Path, help="input image")
    cmp.add_argument("--out", required=True, type=Path, help="folder for compare.json, curves.png and table.md")
    cmp.add_argument("--model", default="demo", help="demo | a diffusers SVD folder | svd_xt.safetensors")
    _add_setting_flags(cmp)

    info = sub.add_parser("info", help="describe torch, CUDA, GPU, VRAM and NVML")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    models = sub.add_parser("models", help="list SVD models found on this machine")
    models.add_argument("--models-dir", action="append", default=[], type=Path, help="another folder to search (repeatable)")
    models.add_argument("--comfyui-root", type=Path, default=None, help="ComfyUI folder (default: $COMFYUI_ROOT)")
    models.add_argument("--json", action="store_true", help="machine-readable output")

    ui = sub.add_parser("ui", help="start the studio in the browser")
    ui.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    ui.add_argument("--listen", action="store_true", help="accept connections from other machines (binds 0.0.0.0)")
    ui.add_argument("--share", action="store_true", help="create a public Gradio link (needs --auth)")
    ui.add_argument("--auth", default=None, help="USER:PASS required to open the studio (or LOWVRAM_STUDIO_AUTH)")
    ui.add_argument("--insecure-share", action="store_true", help="allow --share without --auth")
    ui.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    ui.add_argument("--model", default="demo", help="model to start with")
    ui.add_argument("--outputs", type=Path, default=None,
                    help="folder for videos, records and curves (default: your user data folder; or LOWVRAM_STUDIO_OUTPUTS)")
    return parser


def _setting_names() -> list[str]:
    from .settings_table import TABLE

    return [row.name for row in TABLE.values() if row.flag is not None]


def read_settings_file(path: Path | None) -> dict:
    """The settings a ``--settings`` file holds, each of its field's type (checked before any model loads)."""
    from .models.load import json_kind
    from .settings import RunSettings, SettingsError
    from .settings_table import renamed

    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read settings file {path} ({exc}); give a JSON file saved by the studio") from exc
    if not isinstance(data, dict):
        raise UserError(f"settings file {path} holds {json_kind(data)}, not an object of settings; "
                        'give a JSON file saved by the studio, e.g. {"seed": 7, "num_frames": 14}')
    try:
        RunSettings.from_dict(data)  # unknown names and wrong types; values are checked with the flags
    except SettingsError as exc:
        raise UserError(f"settings file {path}: {exc}; fix the file or leave the setting out") from exc
    return renamed(data, f"settings file {path}")  # 0.1.0's names (chunk_size, ...) under today's


def settings_from_args(args: argparse.Namespace, pipeline, base_settings: "RunSettings | None" = None) -> "RunSettings":
    """Model-native size and frames (or ``base_settings``, e.g. a record's), then a settings file, then explicit flags."""
    from .models.load import native_settings
    from .settings import RunSettings, SettingsError

    base: dict = base_settings.to_dict() if base_settings is not None else native_settings(pipeline)
    base.update(read_settings_file(args.settings))
    base.update({name: getattr(args, name) for name in _setting_names() if getattr(args, name, None) is not None})
    try:
        return RunSettings.from_dict(base).validate()
    except SettingsError as exc:
        raise UserError(str(exc)) from exc


class _ProgressPrinter:
    """A tqdm bar over denoise steps plus a line per phase, on stderr. ``close()`` ends the bar, also when
    the run fails, so the ``error:`` line starts a line of its own."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        from .engine.events import Phase

        if event.phase == Phase.DENOISE and event.total:
            if self.bar is None:
                self.bar = tqdm(total=event.total, desc="denoise", unit="step", file=sys.stderr)
            self.bar.n = event.step or 0
            self.bar.refresh()
            return
        self.close()
        print(f"[{event.phase.value}] {event.message}".rstrip(), file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _apply_record(args: argparse.Namespace) -> "RunSettings | None":
    """With --from-record: fill --image, --out and --model from the record where not given; print what was
    restored and what the explicit flags override. Returns the record's settings (None without a record)."""
    from .media import unique_path
    from .monitor.reuse import load_reuse

    if args.from_record is None:
        for flag, value in (("--image", args.image), ("--out", args.out)):
            if value is None:
                raise UserError(f"{flag} is required; give it, or --from-record OUT.json to reuse an earlier run")
        return None
    reused = load_reuse(args.from_record)
    print(f"note: {reused.summary()}", file=sys.stderr)
    notes = [*reused.notes, reused.image_note if args.image is None else None]
    for note in filter(None, notes):
        print(f"note: {note}", file=sys.stderr)
    recorded = reused.settings.to_dict()
    overrides = [f"{name} {recorded[name]} -> {getattr(args, name)}" for name in _setting_names()
                 if getattr(args, name, None) is not None and getattr(args, name) != recorded[name]]
    if args.model is not None and args.model != reused.model:
        overrides.insert(0, f"model {reused.model} -> {args.model}")
    if args.settings is not None:
        overrides.insert(0, f"settings file {args.settings}")
    if overrides:
        print("note: flags override the record: " + "; ".join(overrides), file=sys.stderr)
    args.model = args.model or reused.model
    if args.image is None:
        if reused.image is None:
            raise UserError(f"the input image of {args.from_record.name} cannot be found; give it with --image")
        args.image = reused.image
    if args.out is None:
        record_path = Path(args.from_record)
        args.out = unique_path(record_path.parent, f"{record_path.stem}-again", ".mp4")
    return reused.settings


def _requested_device(args: argparse.Namespace, recorded: "RunSettings | None") -> tuple[str, str]:
    """The device a run will ask for, known before the model loads (flag, else settings file or record),
    and where that was asked, for messages: ("cuda", "--device cuda")."""
    if args.device is not None:
        device = str(args.device).lower()
        return device, f"--device {device}"
    from_file = read_settings_file(args.settings).get("device")
    if from_file is not None:
        device = str(from_file).lower()  # a str: read_settings_file checked the type
        return device, f'"device": "{device}" in settings file {args.settings}'
    if recorded is not None:
        return recorded.device.value, f"device {recorded.device.value} in the record {args.from_record}"
    return "auto", "device auto"


def check_device(args: argparse.Namespace, recorded: "RunSettings | None") -> None:
    """Before any model loads: this torch runs on the GPU (``check_torch_runs``), and CUDA asked for is there."""
    import torch

    from .sysinfo import TorchGpuError, check_torch_runs

    device, asked = _requested_device(args, recorded)
    check_torch_runs(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise TorchGpuError(
            f"{asked} asked for, but torch sees no CUDA GPU; run on the CPU with --device cpu (or auto, which "
            "takes the GPU when there is one), or see `lowvram-studio info` for what torch and the driver report"
        )


def cmd_generate(args: argparse.Namespace) -> int:
    from .jobs import check_outputs_free, run_job
    from .media import load_image
    from .models.load import load_model
    from .models.safetensors_file import tqdm_progress

    recorded = _apply_record(args)
    args.model = args.model or "demo"
    check_paths(args)  # again: the record may have named the image, the model or the output
    check_outputs_free(args.out, args.gif)
    image = load_image(args.image)
    check_device(args, recorded)
    model = load_model(args.model, on_progress=tqdm_progress(f"loading {Path(args.model).name}"))
    if model.note:
        print(f"note: {model.note}", file=sys.stderr)
    settings = settings_from_args(args, model.pipeline, recorded)
    with contextlib.closing(_ProgressPrinter()) as progress:
        output = run_job(model, image, settings, args.out, on_event=progress, gif=args.gif, image_path=args.image)
    result = output.result
    print(
        f"wrote {output.video} ({result.frames.shape[0]} frames, {settings.width}x{settings.height}) and "
        f"{output.record_path}; {result.seconds_total:.1f} s total, {result.seconds_per_step:.2f} s/step on {result.device}"
        + _against_estimate(result.info.get("speed_estimate"))
        + _prompt_embeddings_note(result.info.get("prompt_embeddings"))
    )
    return 0


def _prompt_embeddings_note(sources: dict[str, str] | None) -> str:
    """'; prompt embeddings from the cache (...)' when a text family's run reused stored embeddings."""
    cached = [role.replace("_", " ") for role, source in (sources or {}).items() if source == "cache"]
    if not cached:
        return ""
    if len(cached) == len(sources):
        return "; prompt embeddings from the cache (the text encoder did not run)"
    return f"; {' and '.join(cached)} embedding from the cache"


def _against_estimate(estimate: dict[str, Any] | None) -> str:
    """', estimated 0.42 s/step' after the measured figure, when the run had an estimate (CUDA runs)."""
    return f", estimated {estimate['seconds_per_step']:.2f} s/step" if estimate else ""


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare
    from .media import load_image
    from .models.load import load_model
    from .monitor.vram import MonitorConfig, measure_idle_baseline

    image = load_image(args.image)
    check_device(args, None)
    device_baseline = measure_idle_baseline().device_used_mib  # before this process starts CUDA
    model = load_model(args.model)
    settings = settings_from_args(args, model.pipeline)
    with contextlib.closing(_ProgressPrinter()) as progress:
        result = run_compare(model, image, settings, args.out, on_event=progress,
                             monitor_config=MonitorConfig(device_baseline_mib=device_baseline))
    print(result.table_md)
    print("wrote " + ", ".join(str(path) for path in result.files.values()))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .sysinfo import collect_env, format_env

    env = collect_env()
    print(json.dumps(env, indent=2) if args.json else format_env(env))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models.discovery import DiscoveryConfig, discover_models, format_candidates

    config = DiscoveryConfig.from_env(args.models_dir, args.comfyui_root)
    found = discover_models(config)
    print(json.dumps([c.to_dict() for c in found], indent=2) if args.json else format_candidates(found, config))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from .ui.serve import launch_studio
    from .ui.queue_entry import QueueError
    from .ui.queue_lock import QueueLocked
    from .ui.share import ShareError

    try:
        return launch_studio(args)
    except (ShareError, QueueError, QueueLocked) as exc:
        raise UserError(str(exc)) from exc


COMMANDS = {"generate": cmd_generate, "compare": cmd_compare, "info": cmd_info, "models": cmd_models, "ui": cmd_ui}


def configure_logging(verbose: bool) -> None:
    """Our INFO logs with -v; the libraries' advice about their own internals only when verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def second_studio_problem() -> str | None:
    """Why ``ui`` must not start (another studio runs the job queue), checked with light imports only."""
    from .ui.queue_lock import QueueLock, QueueLocked, default_queue_dir

    try:
        QueueLock.check_free(default_queue_dir())
    except QueueLocked as exc:
        return str(exc)
    return None


def _name_too_long(flag: str, path: str | Path, limit: int = NAME_MAX_BYTES,
                   what: str = "a file or folder name can have") -> str | None:
    """Why the file system cannot hold ``path``: a part of it longer than ``limit`` bytes."""
    for part in Path(path).parts:
        size = len(os.fsencode(part))
        if size > limit:
            shown = part if len(part) <= 40 else f"{part[:20]}...{part[-12:]}"
            return f"{flag} {shown}: that name is {size} bytes long, more than the {limit} {what}; choose a shorter name"
    return None


def check_paths(args: argparse.Namespace) -> None:
    """Every path the command was given fits the file system, before anything is read, loaded or computed."""
    problems = []
    for name, value in sorted(vars(args).items()):
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, Path) or (name == "model" and isinstance(path, str)):
                problems.append(_name_too_long("--" + name.replace("_", "-"), path))
    if args.command == "generate" and args.out is not None:  # the name fits, but would its temporaries?
        problems.append(_name_too_long("--out", Path(args.out).name, OUT_NAME_MAX_BYTES,
                                       "bytes an output name may have (the temporary files beside it add to it)"))
    for problem in filter(None, problems):
        raise UserError(problem)


def ui_port_problem(args: argparse.Namespace) -> str | None:
    """Why the studio cannot serve on ``--port``: not a port, or another program listens there."""
    from .ui.share import ALL_INTERFACES, LOCAL_HOST

    if args.port is None:
        return None  # the first free port from 7860 is chosen
    if not 1 <= args.port <= 65535:
        return (f"--port {args.port} is not a port; give a number from 1 to 65535, or leave --port out for the "
                "first free one from 7860")
    host = ALL_INTERFACES if args.listen else LOCAL_HOST
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        if os.name != "nt":  # as Gradio binds: a port left in TIME_WAIT by a closed studio is free
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, args.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE or getattr(exc, "winerror", None) == 10048:
                return (f"port {args.port} on {host} is taken by another program (a studio already running?); "
                        "choose another --port, or leave --port out for the first free one from 7860")
            return f"cannot serve on port {args.port} ({exc.strerror or exc}); choose another --port, e.g. 7860"
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def main(argv: Sequence[str] | None = None) -> int:
    _warn_old_flags(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        check_paths(args)
        problem = (second_studio_problem() or ui_port_problem(args)) if args.command == "ui" else None
    except UserError as exc:
        problem = str(exc)
    if problem:  # told at once, before the slow imports below
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    configure_logging(args.verbose)  # before importing models: transformers warns at import

    from .compare import CompareError
    from .engine.events import RunCancelled
    from .engine.oom import OutOfMemoryAfterRetries, ran_out_of_memory
    from .engine.precision import NonFiniteError, PrecisionError
    from .media import MediaError
    from .models.load import ModelError
    from .monitor.reuse import ReuseError
    from .settings import SettingsError
    from .sysinfo import TorchGpuError
    try:
        return COMMANDS[args.command](args)
    except (UserError, MediaError, ModelError, SettingsError, CompareError, PrecisionError, ReuseError,
            TorchGpuError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (OutOfMemoryAfterRetries, NonFiniteError) as exc:  # their messages name what to change
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except (RuntimeError, MemoryError) as exc:  # out of memory outside the engine's re-planning
        if not ran_out_of_memory(exc):
            raise
        print(f"error: out of memory: {_first_line(exc)}; lower the size or frame count, set --vram-budget to "
              "what your GPU has, or close other programs", file=sys.stderr)
        return EXIT_RUN_FAILED
    except RunCancelled:
        print("error: the run was stopped; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
