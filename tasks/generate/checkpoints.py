"""A local folder for a checkpoint that may live in object storage (model/ reads local paths only).

The remote files of the checkpoint (the official layout's, and ComfyUI's files by name, flat or in
ComfyUI's model folders: `model.layout.mirrored`) are fetched one by one through
`storage.local_copy` (fsspec's file cache: a file is kept until its object changes; a copy cut
short is not recorded and is fetched again, the files already fetched are not) and linked into a
mirror of the remote folder, which the loaders read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from model.layout import CheckpointError, mirrored, resolve
from tasks import storage


def local_checkpoint(uri: str, cache_dir: Path | None = None) -> Path:
    """A local folder with the checkpoint at `uri`: a local path as it is, s3://... mirrored into
    the cache (`cache_dir`, default the storage cache). CheckpointError names `uri` and every
    component it lacks (model.layout.resolve)."""
    if not storage.is_remote(uri):
        return Path(uri)
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    try:
        remote = sorted(p for p in fs.find(root) if not p.endswith("/"))
    except FileNotFoundError:
        remote = []
    base = cache_dir or storage.DEFAULT_CACHE
    mirror = base / "checkpoints" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24]
    protocol = uri.split("://", 1)[0]
    for path in remote:
        rel = path[len(root) + 1 :]
        if not mirrored(rel):
            continue
        local = storage.local_copy(f"{protocol}://{path}", base)
        target = mirror / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() and target.resolve() != local.resolve():
            target.unlink()  # the remote object changed: point at the new copy
        if not target.exists():
            target.symlink_to(local.resolve())
    try:  # a mirror that holds nothing does not exist: said so, naming `uri`
        resolve(mirror)
        return mirror
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace(str(mirror), uri)) from None
