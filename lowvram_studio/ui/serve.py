"""Starting, sharing and stopping the studio's server, apart from building its page (ui/app.py).

``serve_studio`` serves a built page without blocking on a free port (``free_port``), exposing only the
outputs and the assets; ``start_studio`` adds the CLI's choices (bind address, password, share link,
browser tab) from ui/share.py; ``launch_studio`` blocks until Ctrl+C; ``RunningStudio.close`` stops it.
"""

from __future__ import annotations

import argparse
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from .app import build_app
from .share import LoginGuard, serve_options, share_report
from .studio import ASSETS, Studio

logger = logging.getLogger(__name__)


def free_port(start: int = 7860, tries: int = 100) -> int:
    """The first port from ``start`` that nothing listens on locally."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise OSError(f"no free port between {start} and {start + tries - 1}; close other servers or pass --port")


@dataclass
class RunningStudio:
    """A started studio: the app, its studio, the addresses, and what to tell the user about sharing."""

    app: gr.Blocks
    studio: Studio
    local_url: str
    share_url: str | None
    share_report: str | None

    def close(self) -> None:
        self.studio.close()
        self.app.close()


def serve_studio(studio: Studio, port: int | None = None, **launch: Any) -> tuple[gr.Blocks, str, str | None]:
    """Build ``studio``'s page and serve it without blocking (the CLI, the tests and bench/watched_cost.py):
    on ``port`` or the first free one from 7860, serving only its outputs and the assets. ``launch``: more
    ``gr.Blocks.launch`` options. Returns the app, its local URL and its share URL (None unless shared)."""
    app = build_app(studio)
    app.queue(default_concurrency_limit=None)
    _, local_url, share_url = app.launch(
        server_port=port or free_port(),
        allowed_paths=[str(studio.output_dir), str(ASSETS)],  # nothing else of this machine is served
        prevent_thread_lock=True,
        **launch,
    )
    return app, local_url, share_url


def start_studio(args: argparse.Namespace) -> RunningStudio:
    """Start serving without blocking (``launch_studio`` blocks; tests use this)."""
    options = serve_options(args.listen, args.share, args.auth, args.insecure_share)
    outputs = getattr(args, "outputs", None)
    studio = Studio(args.model, Path(outputs) if outputs else None)  # QueueLocked if another studio runs
    problem = studio.output_problem()  # also creates the folder
    if problem:
        logger.warning(problem)
    app, local_url, share_url = serve_studio(
        studio,
        args.port,
        server_name=options.server_name,
        inbrowser=not args.no_browser,
        share=options.share,
        auth=LoginGuard(*options.auth) if options.auth else None,
    )
    studio.queue.set_owner(local_url)  # a second studio on this queue says where this one is
    return RunningStudio(app, studio, local_url, share_url, share_report(options.share, share_url, local_url))


def launch_studio(args: argparse.Namespace) -> int:
    """Start the studio for ``lowvram-studio ui``; blocks until Ctrl+C."""
    running = start_studio(args)
    try:
        if running.share_report:
            logger.warning(running.share_report)
        logger.warning("videos, records and curves are saved to %s", running.studio.output_dir)
        running.app.block_thread()
    finally:
        running.studio.close()
    return 0
