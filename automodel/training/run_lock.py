"""One run per ``checkpoint_dir``: a lock file naming the run that holds the folder.

``checkpoint_dir/LOCK`` holds the holder's pid, host and start time; a thread touches it every
``HEARTBEAT_S`` seconds while the run lives. A second run into the folder is refused with a
line naming the holder. A lock whose holder is gone (a run killed with SIGKILL, a node that
died) is stale and taken over: on the same host when its pid is no longer that process, on
another host when it has not been touched for ``STALE_AFTER_S`` seconds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from automodel.common import print0
from automodel.errors import UsageError

LOCK_FILE = "LOCK"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
UNWRITTEN_S = 5.0  # an unreadable lock older than this was left by a run killed writing it


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), if known."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), after "pid (comm)"


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    now = _process_start(pid)
    return started is None or now is None or now == started


class RunLock:
    """Holds ``checkpoint_dir/LOCK`` for this process until ``release()``.

    Args:
        directory: the run's ``checkpoint_dir`` (it exists).

    Raises:
        UsageError: another live run holds the folder.
    """

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self.mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "process_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._stop = threading.Event()
        self._acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
        self._thread.start()

    def _acquire(self) -> None:
        # Long enough for a lock left empty by a run killed while writing it to count as stale.
        deadline = time.monotonic() + 3 * UNWRITTEN_S
        while time.monotonic() < deadline:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.mine, f)
            return
        raise UsageError(f"could not take {self.path}: another run keeps taking it")

    def _read(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _take_over_if_stale(self) -> None:
        """Moves a stale lock out of the way (one taker wins); refuses a live holder's."""
        try:
            seen = self.path.read_bytes()
        except FileNotFoundError:
            return
        holder = self._read(self.path)
        if holder is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return
            if age < UNWRITTEN_S:  # being written right now, or left empty by a killed run
                time.sleep(0.2)
                return
            holder = {"pid": None, "host": "?", "started": "?"}
        why = self._stale(holder)
        if why is None:
            later = ""
            if holder["host"] != self.mine["host"]:
                later = f" (a run that died there is taken over {STALE_AFTER_S:.0f} s later)"
            raise UsageError(
                f"{self.path.parent} is in use by another run (pid {holder['pid']} on "
                f"{holder['host']}, since {holder['started']}): wait for it to end, or choose "
                f"another checkpoint.checkpoint_dir{later}"
            )
        taken = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
        try:
            self.path.rename(taken)
        except FileNotFoundError:
            return  # another run took it first
        if taken.read_bytes() != seen:  # a live lock written after ours was read: put it back
            taken.rename(self.path)
            return
        taken.unlink()
        print0(f"note: took over the lock of a run that is gone ({why})")

    def _stale(self, holder: dict) -> str | None:
        """Why ``holder``'s lock is stale, or None while its run may be alive."""
        if holder["pid"] is None:
            return f"{self.path} was unreadable"
        if holder["host"] == self.mine["host"]:
            if holder["pid"] == os.getpid():
                return "an earlier run of this process did not release it"
            if _alive(holder["pid"], holder.get("process_start")):
                return None
            return f"pid {holder['pid']} on {holder['host']} no longer runs"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released"
        if age < STALE_AFTER_S:
            return None
        return f"pid {holder['pid']} on {holder['host']} has not touched it for {age:.0f} s"

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the folder went away: the run will fail on its own write

    def release(self) -> None:
        """Removes the lock if this process still holds it."""
        self._stop.set()
        if self._read(self.path) == self.mine:
            self.path.unlink(missing_ok=True)
