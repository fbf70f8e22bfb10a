"""Local/S3 paths, atomic writes and the input cache."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tasks import storage


def test_atomic_local_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "video.mp4"
    with pytest.raises(RuntimeError), storage.atomic_local(target) as tmp:
        tmp.write_bytes(b"half a video")
        raise RuntimeError("encoder crashed")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_local_publishes_with_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    with storage.atomic_local(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".report.")
        tmp.write_text("{}")
    mode = stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    assert target.read_text() == "{}"


def test_join_and_parent() -> None:
    assert storage.join("s3://b/out", "a.mp4") == "s3://b/out/a.mp4"
    assert storage.parent("s3://b/in/m.csv") == "s3://b/in"
    assert storage.is_remote("s3://b/x") and not storage.is_remote("/tmp/x") and not storage.is_remote("file:///x")


def test_s3_round_trip_and_cache(s3, tmp_path: Path) -> None:
    src = tmp_path / "clip.bin"
    src.write_bytes(b"first")
    storage.put_file(src, "s3://s2v-examples/t/clip.bin")
    local = storage.local_copy("s3://s2v-examples/t/clip.bin", cache_dir=tmp_path / "cache")
    assert local.read_bytes() == b"first"
    assert (tmp_path / "cache" / "inputs" / "cache").is_file()  # fsspec's filecache keeps its metadata there
    # Same object: served from the cache, not fetched again (the copy is not rewritten).
    written = local.stat().st_mtime_ns
    assert storage.local_copy("s3://s2v-examples/t/clip.bin", cache_dir=tmp_path / "cache") == local
    assert local.stat().st_mtime_ns == written
    # A changed object (new ETag) is fetched anew.
    src.write_bytes(b"second version")
    storage.put_file(src, "s3://s2v-examples/t/clip.bin")
    s3.invalidate_cache()
    fresh = storage.local_copy("s3://s2v-examples/t/clip.bin", cache_dir=tmp_path / "cache")
    assert fresh.read_bytes() == b"second version"
    storage.write_text("s3://s2v-examples/t/r.json", '{"ok": true}')
    assert storage.read_text("s3://s2v-examples/t/r.json") == '{"ok": true}'
    with pytest.raises(FileNotFoundError):
        storage.local_copy("s3://s2v-examples/t/none.bin", cache_dir=tmp_path / "cache")


def test_leftover_parts_of_a_killed_run_are_removed_and_nothing_else(tmp_path: Path) -> None:
    with storage.atomic_local(tmp_path / "kept.mp4") as tmp:
        tmp.write_bytes(b"done")
        left = tmp_path / "sub" / tmp.name  # what a kill at this moment would have left, one folder down
        left.parent.mkdir()
        left.write_bytes(b"half")
    mine = [tmp_path / ".notes.partial.txt", tmp_path / "clip.part.mp4", tmp_path / ".a.b.part"]
    for path in mine:
        path.write_bytes(b"user's")
    assert storage.remove_leftover_parts(tmp_path) == 1
    assert not left.exists() and (tmp_path / "kept.mp4").read_bytes() == b"done"
    assert all(p.exists() for p in mine)


def test_a_failed_atomic_write_names_the_target_not_its_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.mkdir()  # in the way: the rename fails
    with pytest.raises(OSError) as info, storage.atomic_local(target) as tmp:
        tmp.write_text("{}")
    assert info.value.filename == str(target) and ".part" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
