"""Which manifests under a prefix have been processed: the record behind scheduled pick-up.

A manifest is known by the SHA-256 of its bytes, so a renamed copy is not run twice and an
edited file is a new manifest. Claiming is an exclusive create (O_EXCL locally, a
conditional PUT with If-None-Match on S3), so when two scheduled runs overlap (or Prefect
starts the same scheduled run twice after a redeploy) exactly one of them wins each
manifest. A claim without a done record is an unfinished or interrupted run; it is never
taken over automatically (batches can run for days), only reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tasks import storage

MANIFEST_SUFFIXES = (".csv",)


class PickupError(Exception):
    """Scheduled pick-up cannot run; the message names the setting to fix."""


@dataclass(frozen=True)
class Candidate:
    uri: str
    digest: str


def find_manifests(prefix: str) -> list[Candidate]:
    """Every manifest (`*.csv`) directly under `prefix`, with its content hash, sorted by name."""
    try:
        fs, path = storage.filesystem(prefix)
        if not fs.isdir(path):
            raise PickupError(f"the manifest prefix {prefix} does not exist or is not a folder (parameter 'prefix')")
        entries = sorted(fs.ls(path, detail=False, refresh=True) if storage.is_remote(prefix) else fs.ls(path, False))
    except PickupError:
        raise
    except Exception as exc:
        raise PickupError(storage.describe_access_error(prefix, exc, "parameter 'prefix'")) from None
    protocol = prefix.split("://", 1)[0] + "://" if storage.is_remote(prefix) else ""
    found = []
    for entry in entries:
        name = posixpath.basename(entry.rstrip("/"))
        if name.startswith(".") or not name.lower().endswith(MANIFEST_SUFFIXES):
            continue
        uri = protocol + entry if protocol and not entry.startswith(protocol) else entry
        found.append(Candidate(uri=uri, digest=hashlib.sha256(storage.read_bytes(uri)).hexdigest()))
    return found


class ManifestRegistry:
    """Claim and done records of manifests, kept under `root` (a local folder or s3:// prefix)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def _uri(self, digest: str, kind: str) -> str:
        return storage.join(self.root, f"{digest}.{kind}.json")

    def is_processed(self, digest: str) -> bool:
        return storage.exists(self._uri(digest, "done"))

    def claim_info(self, digest: str) -> dict | None:
        try:
            return json.loads(storage.read_text(self._uri(digest, "claim")))
        except FileNotFoundError:
            return None

    def claim(self, candidate: Candidate, owner: str) -> bool:
        """Take the manifest for this run; False when another run has it (or had it)."""
        record = json.dumps({"manifest": candidate.uri, "owner": owner, "claimed_at": _now()}).encode()
        return _create_exclusive(self._uri(candidate.digest, "claim"), record)

    def release(self, candidate: Candidate) -> None:
        """Give a claim back when the batch could not run, so nothing is recorded as processed."""
        fs, path = storage.filesystem(self._uri(candidate.digest, "claim"))
        fs.rm_file(path)

    def mark_processed(self, candidate: Candidate, report: str, counts: dict[str, int]) -> None:
        record = {"manifest": candidate.uri, "report": report, "counts": counts, "finished_at": _now()}
        storage.write_text(self._uri(candidate.digest, "done"), json.dumps(record, indent=2))


def _create_exclusive(uri: str, data: bytes) -> bool:
    if storage.is_remote(uri):
        fs, path = storage.filesystem(uri)
        try:
            fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
        except FileExistsError:
            return False
        except OSError as exc:  # s3fs maps 412 Precondition Failed to an OSError subclass
            if "412" in str(exc) or "PreconditionFailed" in str(exc):
                return False
            raise
        return True
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
