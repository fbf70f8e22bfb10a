"""Paths that may be local or remote (s3://), atomic writes, and a local cache.

fsspec gives one API over local folders and S3 (s3fs); everything here is a thin layer
on it so stages can take a URI and get a local file, or write a local file and have it
land at a URI, without caring where it lives.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import fsspec
from filelock import FileLock
from fsspec.core import url_to_fs
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

_UMASK = os.umask(0)
os.umask(_UMASK)
DEFAULT_CACHE = Path(os.environ.get("S2V_CACHE_DIR", Path.home() / ".cache" / "s2v-batch"))


def is_remote(uri: str) -> bool:
    """True for URIs with a protocol other than the local filesystem (s3://, gs://, ...)."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return protocol not in ("file", "local")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI."""
    if is_remote(base):
        return posixpath.join(base, *parts)
    return str(Path(base).joinpath(*parts))


def parent(uri: str) -> str:
    if is_remote(uri):
        return posixpath.dirname(uri.rstrip("/"))
    return str(Path(uri).resolve().parent)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URI and the path inside it."""
    return url_to_fs(uri)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a local file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_access_error(uri: str, exc: Exception, setting: str) -> str:
    """One sentence for a failure to reach `uri`, naming what to fix (credentials, endpoint, `setting`)."""
    name, text = type(exc).__name__, str(exc)
    if "Credentials" in name or any(k in text for k in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        return (f"cannot read {uri}: S3 credentials are missing or wrong ({name}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for this process")
    if "connect" in text.lower() or isinstance(exc, ConnectionError | TimeoutError):
        return f"cannot reach the storage of {uri} ({name}: {text}); check AWS_ENDPOINT_URL_S3 and the network"
    return f"cannot read {uri} ({setting}): {name}: {text}"


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def local_copy(uri: str, cache_dir: Path | None = None) -> Path:
    """A local path holding the file at `uri`.

    Local paths are returned as they are. Remote files go through fsspec's whole-file cache
    (`filecache`) under `<cache>/inputs`: fetched once, kept across runs with no expiry, and
    fetched anew when the object's identity (ETag, size, modified time) changes.
    """
    if not is_remote(uri):
        return Path(uri)
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)  # a long batch must see objects replaced since it listed them
    storage = (cache_dir or DEFAULT_CACHE) / "inputs"
    storage.mkdir(parents=True, exist_ok=True)
    # fsspec's cache is not safe for two processes fetching the same object at once (Ray workers of
    # one node): one waits for the other, then finds the copy. A fresh instance reads the metadata
    # the other process saved.
    lock = storage / f"{hashlib.sha256(uri.encode()).hexdigest()[:24]}.lock"
    with FileLock(lock):
        cached = fsspec.filesystem("filecache", fs=fs, cache_storage=str(storage), check_files=True,
                                   expiry_time=False, skip_instance_cache=True)
        with cached.open(path, "rb") as f:
            return Path(f.name)


@contextmanager
def atomic_local(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` only on success.

    A crash mid-write leaves no half-written file under the final name, so 'the output
    exists' always means 'the output is complete'.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".part{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; deliverables get the usual permissions of the umask.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def put_file(local: str | Path, uri: str) -> None:
    """Copy a finished local file to `uri` atomically (S3 PUTs are atomic per object)."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        fs.put_file(str(local), path)
        return
    with atomic_local(uri) as tmp:
        shutil.copyfile(local, tmp)


def write_text(uri: str, text: str) -> None:
    """Write text to a local path or URI atomically."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        fs.pipe_file(path, text.encode("utf-8"))
        return
    with atomic_local(uri) as tmp:
        tmp.write_text(text, encoding="utf-8")


def cached_json(
    path: Path, key: str, model: type[M], compute: Callable[[], M], *, field: str = "value",
    valid: Callable[[M], bool] = lambda _: True,
) -> M:
    """The record kept at `path` as {"key": key, field: record} while the key matches and it is still
    `valid`; else `compute()`, written there atomically with the key (a changed input recomputes it)."""
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("key") == key and valid(cached := model.model_validate(data[field])):
            return cached
    value = compute()
    with atomic_local(path) as tmp:
        tmp.write_text(json.dumps({"key": key, field: value.model_dump(mode="json")}))
    return value
