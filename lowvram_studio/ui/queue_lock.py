"""One studio per job queue: an OS file lock in the queue folder, and a note of who holds it.

The OS releases the lock when its process ends in any way (``kill -9`` included), so a crash never
leaves a stale lock. Only light imports here: ``lowvram-studio ui`` checks the lock before it loads
torch and gradio, so a second start is refused at once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import filelock

from ..userdirs import CONFIG_ENV, config_dir, data_dir

QUEUE_FOLDER = "queue"
LOCK_NAME = "queue.lock"
OWNER_NAME = "owner.json"


def default_queue_dir() -> Path:
    """The user data folder's ``queue/`` (it holds image copies: local, not roaming, data); when
    ``LOWVRAM_STUDIO_CONFIG_DIR`` is set (tests, portable installs) the queue lives beside the settings."""
    folder = config_dir() if os.environ.get(CONFIG_ENV) else data_dir()
    return folder / QUEUE_FOLDER


class QueueLocked(ValueError):
    """Another studio process runs the queue in this folder."""


class QueueLock:
    """The lock of one queue folder (which must exist)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._lock = filelock.FileLock(self.folder / LOCK_NAME, timeout=0)

    def acquire(self) -> "QueueLock":
        try:
            self._lock.acquire()
        except filelock.Timeout as exc:
            raise QueueLocked(
                f"another LowVRAM Studio ({self._owner_text()}) is running the job queue in {self.folder}; "
                "use that studio's page, or close it first (a second studio on one GPU would only slow both)"
            ) from exc
        return self

    def release(self) -> None:
        self._lock.release()

    def set_owner(self, url: str | None) -> None:
        """Note this process (and where its page is) for a second studio's message; written atomically."""
        temp = self.folder / f".{OWNER_NAME}.{os.getpid()}"
        temp.write_text(json.dumps({"pid": os.getpid(), "since": time.time(), "url": url}), encoding="utf-8")
        os.replace(temp, self.folder / OWNER_NAME)

    def _owner_text(self) -> str:
        try:
            owner = json.loads((self.folder / OWNER_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "process unknown"
        since = time.strftime("%H:%M", time.localtime(owner.get("since", 0)))
        return f"process {owner.get('pid')}, started {since}" + (f", at {owner['url']}" if owner.get("url") else "")

    @classmethod
    def check_free(cls, folder: Path) -> None:
        """Raise ``QueueLocked`` now if another studio holds ``folder`` (a quick check before a slow start)."""
        if (Path(folder) / LOCK_NAME).exists():
            cls(folder).acquire().release()
