"""Small, full or read-only disks for tests: a tmpfs mounted in a private mount namespace (`unshare`).

The mount exists only for the command run inside the namespace and vanishes with it, so nothing is
left mounted on the machine. As root `unshare --mount` is enough; other users get a user namespace
(`unshare -r`), which most Linux kernels allow. Where neither works the tests that need a disk skip,
saying why.
"""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tmpfs:
    """A tmpfs at `path` of `size_mb`, optionally read-only, with `fill_mb` taken by a file before the command."""

    path: Path
    size_mb: int
    read_only: bool = False
    fill_mb: int = 0

    def script(self) -> str:
        where = shlex.quote(str(self.path))
        lines = [f"mkdir -p {where}", f"mount -t tmpfs -o size={self.size_mb}m tmpfs {where}"]
        if self.fill_mb:
            # dd stops at the end of the disk (that is the point); the braces keep its failure from masking others
            fill = f"dd if=/dev/zero of={where}/filler bs=1M count={self.fill_mb} status=none 2>/dev/null"
            lines.append(f"{{ {fill}; true; }}")
        if self.read_only:
            lines.append(f"mount -o remount,ro {where}")
        return " && ".join(lines)


def _prefix() -> list[str]:
    base = ["unshare", "--mount", "--propagation", "private"]
    return base if os.geteuid() == 0 else ["unshare", "-r", *base[1:]]


@functools.cache
def unavailable() -> str | None:
    """Why no tmpfs can be mounted here (None: it can)."""
    try:
        done = subprocess.run([*_prefix(), "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && echo ok"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare cannot run: {exc}"
    return None if done.stdout.strip() == "ok" else f"cannot mount a tmpfs in a namespace: {done.stderr.strip()}"


def run_with_disks(disks: list[Tmpfs], command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run `command` with `disks` mounted (only it sees them)."""
    script = " && ".join(d.script() for d in disks) + ' && exec "$@"'
    return subprocess.run([*_prefix(), "sh", "-c", script, "sh", *command], **kwargs)
