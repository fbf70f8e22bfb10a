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
import re
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
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f"{PART_SUFFIX}{target.suffix}",
                                        dir=target.parent)
    except OSError as exc:
        raise _naming(exc, target) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; deliverables get the usual permissions of the umask.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    except OSError as exc:
        if exc.filename in (str(tmp), tmp):
            raise _naming(exc, target) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


PART_SUFFIX = ".part"
"""Marks `atomic_local`'s temporary files (`.<stem>.<random>.part<suffix>`); a killed run leaves them
behind, and the next run into the same place removes them (`remove_leftover_parts`)."""


def _naming(exc: OSError, target: Path) -> OSError:
    """The same error naming the file being written, not its temporary name (which means nothing to anyone)."""
    return type(exc)(exc.errno, exc.strerror, str(target)) if exc.errno else exc


def remove_leftover_parts(folder: str | Path) -> int:
    """Delete the temporary files a killed run left under the local `folder` (`atomic_local`'s
    `.*.part*`); only call it while no other run writes there. Returns how many were removed."""
    removed = 0
    root = Path(folder)
    if is_remote(str(folder)) or not root.is_dir():  # object stores have no half-written objects
        return 0
    for path in root.rglob(f".*{PART_SUFFIX}*"):
        if path.is_file() and _is_part_name(path.name):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


# .<stem>.<8 random characters>.part<suffix>: mkstemp's random part is 8 of [a-z0-9_]; a user's own
# ".notes.partial.txt" does not match.
_PART_NAME = re.compile(rf"\..*\.[a-z0-9_]{{8}}{re.escape(PART_SUFFIX)}(\.[^.]+)?")


def _is_part_name(name: str) -> bool:
    return _PART_NAME.fullmatch(name) is not None


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
