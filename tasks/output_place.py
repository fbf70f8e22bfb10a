"""Where a batch writes, checked before any work, and disk errors named when they strike mid-run.

A batch writes its deliverables to OUT (local or s3://) and its work files to a local work folder.
`check_places` refuses, in one line naming the path and the cause, a place the batch could not write:
an OUT that is a file, a read-only or unwritable folder, a disk with (nearly) no room, an S3 prefix the
credentials cannot write. It creates nothing: a folder that does not exist yet is judged by the
nearest existing folder above it, which is where the batch will create it.

`disk_cause` recognises the errors a full or read-only disk raises deep inside a stage (an OSError,
or ffmpeg's "No space left on device" in its log) so the row's failure says so instead of
"Conversion failed!".
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from tasks import storage

MIN_FREE_BYTES = 64 * 2**20
"""Less room than this on the disk of OUT or the work folder and a batch does not start: the disk is
full in any sense that matters (one normalized minute of speech is 11 MB, a clip a few MB)."""

_DISK_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
_DISK_TEXTS = ("No space left on device", "Disk quota exceeded", "Read-only file system")


class OutputError(Exception):
    """The batch cannot write where it was told to; the message names the path and the cause."""


def check_places(out: str, work_dir: str | Path) -> None:
    """OutputError naming the path and the cause when the batch could not write OUT or its work folder."""
    places = [(out, "output folder"), (str(work_dir), "work folder")]
    for place, what in places:
        reason = remote_problem(place) if storage.is_remote(place) else local_problem(Path(place))
        if reason:
            raise OutputError(f"{what} {place}: {reason}")


def local_problem(folder: Path) -> str | None:
    """Why a batch could not write into the local `folder` (None: it can)."""
    existing = folder
    try:
        while not existing.exists():
            if existing.is_symlink():  # a dangling link: creating the folder would fail
                return f"{existing} is a link to nothing"
            existing = existing.parent
    except OSError as exc:
        return _reason(exc)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        flags = os.statvfs(existing).f_flag
        free = shutil.disk_usage(existing).free
    except OSError as exc:
        return _reason(exc)
    if flags & os.ST_RDONLY:
        return f"{existing} is on a read-only file system"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable (permission denied)"
    if free < MIN_FREE_BYTES:
        return (f"the disk is full ({free / 2**20:.1f} MB free at {existing}; a batch needs at least "
                f"{MIN_FREE_BYTES // 2**20} MB to start)")
    return None


def remote_problem(uri: str) -> str | None:
    """Why a batch could not write under the remote prefix `uri`: a small probe object is written and
    removed (listing alone does not prove the right to write)."""
    probe = storage.join(uri, f".s2v-write-test-{uuid.uuid4().hex}")
    try:
        fs, path = storage.filesystem(probe)
        fs.pipe_file(path, b"")
        fs.rm_file(path)
    except Exception as exc:  # credentials, endpoint, bucket, policy: the client's words, one line
        return storage.describe_access_error(uri, exc, "--out").replace("cannot read", "cannot write to", 1)
    return None


def disk_cause(exc: BaseException) -> str | None:
    """'no space left on device' (or a quota, a read-only disk) when that is what `exc` comes from:
    the OSError itself, one it was raised from, or ffmpeg's log quoted in its message."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_ERRNOS:
            return _DISK_ERRNOS[current.errno]
        text = str(current)
        for phrase in _DISK_TEXTS:
            if phrase in text:
                return phrase[0].lower() + phrase[1:].lower()
        current = current.__cause__ or current.__context__
    return None


def describe_disk_failure(exc: BaseException, *places: str | Path) -> str | None:
    """The row's failure when the disk caused it: the cause, the room left where the batch writes,
    and what to do; None when `exc` is not a disk error."""
    cause = disk_cause(exc)
    if cause is None:
        return None
    room = []
    for place in places:
        if place and not storage.is_remote(str(place)):
            try:
                existing = Path(place)
                while not existing.exists():
                    existing = existing.parent
                room.append(f"{shutil.disk_usage(existing).free / 2**20:.1f} MB free at {place}")
            except OSError:
                continue
    where = f" ({'; '.join(room)})" if room else ""
    return f"{cause}{where}: free some space and rerun; finished rows and clips are kept"


def _reason(exc: OSError) -> str:
    if exc.errno in _DISK_ERRNOS:
        return _DISK_ERRNOS[exc.errno]
    return (exc.strerror or str(exc)).lower()
