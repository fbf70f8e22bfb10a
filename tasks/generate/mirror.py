"""Segment folders mirrored in a store (s3:// or a shared folder), for workers on other nodes.

Without a store, the pool's workers write into the driver's work folder, which only
works when they share its filesystem. With one, the driver uploads each segment's inputs
(content-addressed, so a row's image is stored once), a worker downloads them, pulls the
segment's finished clips and kept state from the store into its own scratch folder, and
uploads every clip as soon as the stage has written it (state first, then clip, the same
order the stage keeps locally, so "the last clip is stored" implies "its state is stored").
The store keeps states as the stage does: only the last finished clip's, none once the
segment is done (`drop_states`). A retry on any node, or a rerun of the batch, thus
resumes at the first missing clip.

The store keeps a segment's clips under its job fingerprint
(`STORE/<row id>/seg_NNN/<fingerprint>/`, with the stage's `segment.json`), so clips of
a changed job are never mixed in.
"""

from __future__ import annotations

from pathlib import Path

from tasks import storage
from tasks.generate.stage import MARKER, STATE_GLOB, STATE_SUFFIX
from tasks.records import SegmentJob

INPUT_FIELDS = ("image", "audio", "pose_video")


def store_inputs(job: SegmentJob, store: str) -> SegmentJob:
    """Driver side: upload the job's local input files and point the job at the stored copies."""
    update = {}
    for name in INPUT_FIELDS:
        path = getattr(job, name)
        if not path or storage.is_remote(path):
            continue
        uri = storage.join(store, "inputs", storage.file_digest(path) + Path(path).suffix)
        if not storage.exists(uri):
            storage.put_file(path, uri)
        update[name] = uri
    return job.model_copy(update=update)


def localize_inputs(job: SegmentJob, cache_dir: Path | None = None) -> SegmentJob:
    """Worker side: local copies of stored inputs (downloaded once per node, see `storage.local_copy`)."""
    update = {}
    for name in INPUT_FIELDS:
        uri = getattr(job, name)
        if uri and storage.is_remote(uri):
            update[name] = str(storage.local_copy(uri, cache_dir))
    return job.model_copy(update=update)


def segment_uri(store: str, job: SegmentJob, fingerprint: str) -> str:
    return storage.join(store, job.row_id, f"seg_{job.segment.index:03d}", fingerprint[:24])


def pull(uri: str, local_dir: Path) -> int:
    """Download the stored clips and states missing from `local_dir`; returns the files fetched.

    A local folder holding another job's clips is cleared first. States come down before
    clips, each file renamed into place whole, so the local folder never holds a clip
    without its state.
    """
    fs, root = storage.filesystem(uri)
    fs.invalidate_cache(root)  # s3fs caches listings; other processes have written since
    try:
        names = [Path(p).name for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return 0
    local_dir.mkdir(parents=True, exist_ok=True)
    if MARKER in names:
        # Local clips written for another job (another marker) must not stand in for stored ones.
        local_marker = local_dir / MARKER
        stored_marker = fs.cat_file(f"{root.rstrip('/')}/{MARKER}")
        if local_marker.exists() and local_marker.read_bytes() != stored_marker:
            for stale in [local_marker, *local_dir.glob("clip_*.mp4"), *local_dir.glob(STATE_GLOB)]:
                stale.unlink()
    # The marker first (the stage clears clips of a folder without it), then states, then clips.
    marker = [n for n in names if n == MARKER]
    states = sorted(n for n in names if n.endswith(STATE_SUFFIX))
    wanted = marker + states + sorted(n for n in names if n.startswith("clip_") and n.endswith(".mp4"))
    fetched = 0
    for name in wanted:
        target = local_dir / name
        if target.exists():
            continue
        with storage.atomic_local(target) as tmp:
            fs.get_file(f"{root.rstrip('/')}/{name}", str(tmp))
        fetched += 1
    return fetched


def push(local_file: Path, uri: str) -> None:
    """Upload one finished file into the segment's stored folder."""
    storage.put_file(local_file, storage.join(uri, Path(local_file).name))


def drop_states(uri: str, keep: str | None = None) -> None:
    """Delete the segment's stored states except the one named `keep`."""
    fs, root = storage.filesystem(uri)
    fs.invalidate_cache(root)
    try:
        names = [Path(p).name for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return
    doomed = [f"{root.rstrip('/')}/{n}" for n in names if n.endswith((STATE_SUFFIX, ".state.npz")) and n != keep]
    if doomed:
        fs.rm(doomed)


def stored(local_file: Path, uri: str) -> bool:
    """True when the store holds `local_file` (same name and size)."""
    fs, root = storage.filesystem(storage.join(uri, Path(local_file).name))
    try:
        return fs.size(root) == Path(local_file).stat().st_size
    except FileNotFoundError:
        return False
