"""The output folder's lock (tasks/runlock.py) on a local folder and on S3 (moto), and what `status` makes of it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import runlock
from tasks.runlock import LockInfo, RunLocked


def _hold_in_child(out: Path) -> subprocess.Popen:
    """Another process holding the lock of `out` until its stdin closes."""
    code = ("import sys; from tasks import runlock\n"
            "lock = runlock.acquire(sys.argv[1], 'a test run')\n"
            "print('held', flush=True); sys.stdin.read(); lock.release()\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).parents[1])
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_run_is_refused_naming_the_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = _hold_in_child(out)
    try:
        with pytest.raises(RunLocked) as info:
            runlock.acquire(str(out))
        message = str(info.value)
        assert f"another run is writing to {out}: process {child.pid} on host {socket.gethostname()}" in message
        assert "(a test run)" in message and "last heartbeat" in message
        holder = runlock.holder(str(out))
        assert holder is not None and holder.pid == child.pid
    finally:
        child.communicate("")
    # Released: the next run takes it.
    assert runlock.holder(str(out)) is None
    with runlock.hold(str(out)) as lock:
        assert lock.info.pid == os.getpid() and runlock.holder(str(out)).pid == os.getpid()
    assert runlock.holder(str(out)) is None


def test_a_killed_run_never_blocks_the_next(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = _hold_in_child(out)
    child.kill()  # kill -9: no release; the kernel drops the flock with the process
    child.wait()
    child.stdin.close()
    child.stdout.close()
    left = json.loads((out / ".s2v" / "lock.json").read_text())
    assert left["pid"] == child.pid  # the dead run's record is still there...
    assert runlock.holder(str(out)) is None  # ...but nobody holds it
    runlock.acquire(str(out)).release()


def test_a_fresh_lock_of_another_host_counts_on_a_shared_folder(tmp_path: Path) -> None:
    """flock may not reach across hosts on a network file system: the heartbeat does."""
    out = tmp_path / "out"
    path = out / ".s2v" / "lock.json"
    path.parent.mkdir(parents=True)
    other = LockInfo(host="render-02", pid=4242, started_at="2025-01-01T00:00:00+00:00", heartbeat=time.time(),
                     token="t", run="batch of m.csv")
    path.write_text(json.dumps(other.__dict__))
    with pytest.raises(RunLocked, match="process 4242 on host render-02"):
        runlock.acquire(str(out))
    assert runlock.holder(str(out)) == other
    stale = LockInfo(**{**other.__dict__, "heartbeat": time.time() - runlock.STALE_AFTER_S - 5})
    path.write_text(json.dumps(stale.__dict__))
    assert runlock.holder(str(out)) is None
    runlock.acquire(str(out)).release()


def test_s3_lock_is_exclusive_and_stale_locks_are_taken_over(s3) -> None:
    out = "s3://s2v-examples/locked"
    first = runlock.acquire(out, "first")
    try:
        with pytest.raises(RunLocked, match=r"\(first\)"):
            runlock.acquire(out, "second")
        assert runlock.holder(out).token == first.info.token
    finally:
        first.release()
    assert not s3.exists("s2v-examples/locked/.s2v/lock.json")
    assert runlock.holder(out) is None

    # A run that died without releasing: its heartbeat ages past the limit and the next run takes over.
    dead = LockInfo(host="gone", pid=1, started_at="2025-01-01T00:00:00+00:00",
                    heartbeat=time.time() - runlock.STALE_AFTER_S - 1, token="old")
    s3.pipe_file("s2v-examples/locked/.s2v/lock.json", json.dumps(dead.__dict__).encode())
    assert runlock.holder(out) is None
    taken = runlock.acquire(out, "third")
    try:
        stored = json.loads(s3.cat_file("s2v-examples/locked/.s2v/lock.json"))
        assert stored["token"] == taken.info.token and stored["run"] == "third"
    finally:
        taken.release()


def test_status_calls_unfinished_rows_of_a_dead_run_interrupted(tmp_path: Path) -> None:
    from tasks.records import Plan, Segment
    from tasks.status import batch_status

    out = tmp_path / "out"
    work = out / ".s2v" / "work" / "talk"
    (work / "seg_000").mkdir(parents=True)
    plan = Plan(row_id="talk", fps=16, infer_frames=80, sample_rate=16000, width=832, height=480, segments=[
        Segment(index=0, start_sample=0, end_sample=160000, start_s=0, end_s=10, frames=160, clips=2, seed=1)])
    (work / "plan.json").write_text(plan.model_dump_json())
    (work / "seg_000" / "clip_0000.mp4").write_bytes(b"clip")
    (row,) = batch_status(str(out))
    assert (row.state, row.clips_done, row.clips) == ("interrupted", 1, 2)
    child = _hold_in_child(out)
    try:
        (row,) = batch_status(str(out))
        assert row.state == "generating"
        shown = subprocess.run([sys.executable, "-m", "flows", "status", str(out)], capture_output=True, text=True,
                               cwd=Path(__file__).parents[1], env={**os.environ, "COLUMNS": "200"})
        assert shown.returncode == 0 and f"running: process {child.pid}" in shown.stdout
    finally:
        child.communicate("")
    shown = subprocess.run([sys.executable, "-m", "flows", "status", str(out)], capture_output=True, text=True,
                           cwd=Path(__file__).parents[1], env={**os.environ, "COLUMNS": "200"})
    assert "interrupted" in shown.stdout and "generating" not in shown.stdout
    assert "no run is writing to this output now; rerun the manifest to finish the interrupted rows" in shown.stdout
