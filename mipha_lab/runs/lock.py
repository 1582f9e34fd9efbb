"""One trainer per run folder: an exclusive lock on `<run>/.lock` that names its holder.

The operating system drops the lock when the holding process dies (kill -9 included), so a lock
file left by a dead process is stale: the next launch takes it over and says so. A live holder makes
a second launch fail with its host, pid and start time.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from mipha_lab.errors import MiphaLabError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class RunLocked(MiphaLabError):
    """Another live process trains in this run folder."""


class RunLock:
    """One process trains in a run folder at a time: a lock file holding the owner's host and pid."""

    def __init__(self, run_path: Path) -> None:
        self.path = Path(run_path) / LOCK_NAME
        self.handle: Any = None

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def held(self) -> bool:
        """Whether a live process holds the lock now (asked without taking it)."""
        if not self.path.is_file():
            return False
        with open(self.path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - the lock lives as long as this handle (release closes it)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            who = self.holder()
            raise RunLocked(
                f"run folder {self.path.parent} is locked by host {who.get('host', '?')}, pid {who.get('pid', '?')} "
                f"(since {who.get('since', '?')}); wait for it to finish, stop it, or choose another run_name=..."
            ) from None
        previous = self.holder()
        if previous:
            log.warning(
                "taking over a stale lock of %s (host %s, pid %s, since %s): that process is gone",
                self.path.parent,
                previous.get("host"),
                previous.get("pid"),
                previous.get("since"),
            )
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                }
            )
        )
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()  # an empty lock file: released cleanly, nothing stale
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
