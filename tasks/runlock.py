"""One run at a time writes into an output folder: a lock at OUT/.s2v/lock.json.

Two runs into the same output would both redo every unfinished row and overwrite each other's
files. The run that takes the lock writes its host, process id, start time and a heartbeat into
it; a second run stops with a message naming the holder (`RunLocked`).

* Local OUT: the lock file is held with `flock`, which the kernel releases when the holding process
  ends, however it ends (kill -9 included), so a dead run never blocks the next one. The heartbeat
  covers file systems shared between hosts, where `flock` may not reach the other host: a lock
  written by another host with a fresh heartbeat counts as held.
* s3:// OUT: the lock object is created with a conditional PUT (If-None-Match: *), so exactly one
  of two racing runs creates it. A lock whose heartbeat is older than `STALE_AFTER_S`, or that
  names a process of this host that no longer exists, is stale: it is removed and taken over.
  (Removal and re-creation are two requests: two runs taking over the same stale lock in the same
  instant could both see it gone, and then only one creates it; the other stops.)

`holder(out)` tells `s2v-batch status` whether a live run holds the output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from tasks import layout, storage

logger = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
"""How often the holder rewrites its heartbeat."""
STALE_AFTER_S = 180.0
"""A lock whose heartbeat is older than this (six missed beats) belongs to a run that is gone."""
_LOCAL_SIZE = 1024
"""The local lock's content is padded to this size and rewritten in place (the file must keep its
inode: flock is on it), so a reader sees the old or the new content, never a truncated one."""


@dataclass(frozen=True)
class LockInfo:
    """Who holds an output folder."""

    host: str
    pid: int
    started_at: str
    heartbeat: float
    """Seconds since the epoch of the holder's last beat."""
    token: str
    run: str = ""
    """What the run is (the command or flow run), for the message."""

    def describe(self, now: float | None = None) -> str:
        age = max(0.0, (now or time.time()) - self.heartbeat)
        what = f" ({self.run})" if self.run else ""
        return (f"process {self.pid} on host {self.host}{what}, started {self.started_at}, "
                f"last heartbeat {age:.0f} s ago")

    def is_stale(self, now: float | None = None) -> bool:
        """Past its heartbeat, or naming a process of this host that has ended."""
        if (now or time.time()) - self.heartbeat > STALE_AFTER_S:
            return True
        return self.host == socket.gethostname() and not _process_alive(self.pid)


class RunLocked(Exception):
    """Another live run holds the output folder; the message names it and what to do."""

    def __init__(self, out: str, info: LockInfo | None):
        self.info = info
        who = info.describe() if info else "another run"
        super().__init__(
            f"another run is writing to {out}: {who}. Wait for it to finish or stop it, then run again "
            f"(finished rows are kept); a lock without a heartbeat for {STALE_AFTER_S:.0f} s is taken over"
        )


def lock_uri(out: str) -> str:
    return storage.join(out, layout.STATE_DIR, "lock.json")


class RunLock:
    """The held lock of one run: beats in a background thread until `release`."""

    def __init__(self, out: str, info: LockInfo, fd: int | None):
        self.out, self.info, self._fd = out, info, fd
        self._stop = threading.Event()
        self._beater = threading.Thread(target=self._beat, name="s2v-lock-heartbeat", daemon=True)
        self._beater.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self._renew():
                    logger.error("the lock on %s was taken over by another run; this run goes on", self.out)
                    return
            except Exception as exc:  # a network blip: the next beat tries again
                logger.warning("could not renew the lock on %s: %s", self.out, exc)

    def _renew(self) -> bool:
        info = LockInfo(**{**asdict(self.info), "heartbeat": time.time()})
        if self._fd is not None:
            _write_local(self._fd, info)
        else:
            current = _read_remote(self.out)
            if current is None or current.token != self.info.token:
                return False
            fs, path = storage.filesystem(lock_uri(self.out))
            fs.pipe_file(path, _encode(info))
        self.info = info
        return True

    def release(self) -> None:
        """Stop beating and let go: unlock (local) or remove the lock object if it is still ours."""
        self._stop.set()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                _write_local(self._fd, None)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            return
        with contextlib.suppress(Exception):
            current = _read_remote(self.out)
            if current is not None and current.token == self.info.token:
                fs, path = storage.filesystem(lock_uri(self.out))
                fs.rm_file(path)


def acquire(out: str, run: str = "") -> RunLock:
    """Take the lock of `out` for this process; RunLocked when a live run holds it."""
    info = LockInfo(host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex, run=run,
                    started_at=datetime.now(UTC).isoformat(timespec="seconds"), heartbeat=time.time())
    if storage.is_remote(out):
        _acquire_remote(out, info)
        return RunLock(out, info, None)
    return RunLock(out, info, _acquire_local(out, info))


@contextlib.contextmanager
def hold(out: str, run: str = "") -> Iterator[RunLock]:
    """The lock of `out` while the block runs (see `acquire`)."""
    lock = acquire(out, run)
    try:
        yield lock
    finally:
        lock.release()


def holder(out: str) -> LockInfo | None:
    """The live run holding `out`, if any (a stale or released lock: None)."""
    if storage.is_remote(out):
        info = _read_remote(out)
        return info if info is not None and not info.is_stale() else None
    path = Path(lock_uri(out))
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held by a live process
            return _read_local(fd) or LockInfo(host="?", pid=0, started_at="?", heartbeat=time.time(), token="")
        info = _read_local(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        # Not held here; on a folder shared between hosts another host's fresh heartbeat still counts.
        if info is not None and info.host != socket.gethostname() and not info.is_stale():
            return info
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------- local


def _acquire_local(out: str, info: LockInfo) -> int:
    path = Path(lock_uri(out))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(out, _read_local(fd)) from None
        current = _read_local(fd)
        if current is not None and current.host != socket.gethostname() and not current.is_stale():
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise RunLocked(out, current)
        _write_local(fd, info)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _encode(info: LockInfo | None) -> bytes:
    return json.dumps(asdict(info) if info else {}).encode()


def _write_local(fd: int, info: LockInfo | None) -> None:
    data = _encode(info)
    os.pwrite(fd, data.ljust(_LOCAL_SIZE), 0)


def _read_local(fd: int) -> LockInfo | None:
    try:
        return _decode(os.pread(fd, _LOCAL_SIZE * 4, 0))
    except OSError:
        return None


def _decode(data: bytes) -> LockInfo | None:
    try:
        doc = json.loads(data.decode("utf-8") or "{}")
        return LockInfo(**doc) if doc else None
    except (ValueError, TypeError):
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


# ---------------------------------------------------------------- s3:// and other remote stores


def _read_remote(out: str) -> LockInfo | None:
    fs, path = storage.filesystem(lock_uri(out))
    try:
        fs.invalidate_cache(path)
        return _decode(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _acquire_remote(out: str, info: LockInfo) -> None:
    fs, path = storage.filesystem(lock_uri(out))
    for _ in range(2):  # the second try follows the removal of a stale lock
        try:
            fs.pipe_file(path, _encode(info), mode="create")
            return
        except FileExistsError:
            pass
        except OSError as exc:  # stores answering 412 without naming the condition
            if exc.errno != errno.EINVAL and "Precondition" not in str(exc):
                raise
        current = _read_remote(out)
        if current is not None and not current.is_stale():
            raise RunLocked(out, current)
        logger.warning("taking over the stale lock on %s: %s", out, current.describe() if current else "unreadable")
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
    raise RunLocked(out, _read_remote(out))
