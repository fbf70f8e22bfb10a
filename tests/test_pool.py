"""The GPU pool on a real local Ray with declared (fake) GPUs: workers, scheduling, results, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from paced import PACED, PacedGenerator, paced_job
from PIL import Image

from tasks.generate import stage
from tasks.generate.pool import GeneratorPool
from tasks.generate.pool_config import PoolConfig, PoolError, SegmentEvent, SegmentFailed
from tasks.generate.preview import PreviewGenerator

pytestmark = pytest.mark.usefixtures("local_ray")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pool():
    config = PoolConfig(backend=PACED, backend_options={"clip_s": 0.05}, workers=2, attempts=2, backoff_s=0.1)
    with GeneratorPool(config) as p:
        yield p


def test_one_worker_per_gpu_serves_many_segments(pool: GeneratorPool, inputs, tmp_path: Path) -> None:
    assert len(pool.workers) == 2
    assert len({tuple(w.gpus) for w in pool.workers}) == 2 and all(len(w.gpus) == 1 for w in pool.workers)
    pids = {w.pid for w in pool.workers}
    futures = [pool.submit(paced_job(inputs, f"r{i}", 0, 2), tmp_path / f"r{i}") for i in range(6)]
    results = [f.result(timeout=60) for f in futures]
    served = [next(p for p in pids if f"pid {p} " in r.worker) for r in results]
    # No process besides the two workers rendered anything: each loaded its generator once.
    assert set(served) == pids
    for r in results:
        assert r.attempts == 1 and len(r.clips) == 2 and r.gpu_s > 0
        assert all(Path(c.path).exists() and c.state is None for c in r.clips)
    assert not list(tmp_path.glob("**/*.state.*"))  # a finished segment keeps no state


def test_longest_segment_first_and_one_row_on_several_workers(pool: GeneratorPool, inputs, tmp_path) -> None:
    started: list[tuple[str, int]] = []
    blocking = threading.Semaphore(0)

    def on_event(event: SegmentEvent) -> None:  # runs on the pool's thread: never block here
        if event.kind == "started":
            started.append((event.row_id, event.segment_index))
            if event.row_id == "block":
                blocking.release()

    # Two blockers occupy both workers while the rest is queued, so the queue order shows.
    blockers = [pool.submit(paced_job(inputs, "block", i, 4), tmp_path / f"b{i}", on_event) for i in range(2)]
    assert blocking.acquire(timeout=30) and blocking.acquire(timeout=30)
    lengths = {("a", 0): 1, ("a", 1): 5, ("b", 0): 3, ("b", 1): 2, ("c", 0): 4}
    futures = [
        pool.submit(paced_job(inputs, row, i, n), tmp_path / f"{row}{i}", on_event) for (row, i), n in lengths.items()
    ]
    for f in [*blockers, *futures]:
        f.result(timeout=60)
    order = [s for s in started if s[0] != "block"]
    assert [lengths[s] for s in order] == sorted(lengths.values(), reverse=True)
    # Row b's two segments ran at the same time on the two workers.
    runs = {(s.row_id, s.segment_index): s for s in pool.stats if s.outcome == "done"}
    b0, b1 = runs[("b", 0)], runs[("b", 1)]
    assert b0.worker != b1.worker and b0.dispatched < b1.finished and b1.dispatched < b0.finished


def test_pool_clips_equal_an_in_process_run(pool: GeneratorPool, inputs, tmp_path: Path) -> None:
    job = paced_job(inputs, "same", 3, 3, seed=7)
    remote = pool.submit(job, tmp_path / "pool").result(timeout=60)
    local = stage.generate_segment(job, PacedGenerator(clip_s=0), tmp_path / "local")
    # Each clip's frames follow from the float32 state carried from the clip before.
    for a, b in zip(remote.clips, local.clips, strict=True):
        assert Path(a.path).read_bytes() == Path(b.path).read_bytes()


def test_preview_backend_by_name_matches_in_process(inputs, tmp_path: Path) -> None:
    job = paced_job(inputs, "preview", 0, 2)
    with GeneratorPool(PoolConfig(backend="preview", workers=1)) as preview_pool:
        remote = preview_pool.submit(job, tmp_path / "pool").result(timeout=60)
    local = stage.generate_segment(job, PreviewGenerator(), tmp_path / "local")
    assert remote.backend == "preview"
    assert [Path(c.path).read_bytes() for c in remote.clips] == [Path(c.path).read_bytes() for c in local.clips]


def test_vanished_input_fails_at_once_naming_the_path(pool: GeneratorPool, inputs, tmp_path: Path) -> None:
    image = tmp_path / "gone.png"
    Image.open(inputs[0]).save(image)
    job = paced_job(inputs, "gone", 0, 2).model_copy(update={"image": str(image)})
    image.unlink()
    with pytest.raises(SegmentFailed) as info:
        pool.submit(job, tmp_path / "gone").result(timeout=60)
    assert info.value.attempts == 1 and str(image) in str(info.value)


def test_worker_that_cannot_load_is_left_out(pool: GeneratorPool, inputs, tmp_path: Path) -> None:
    held = {g for w in pool.workers for g in w.gpus}
    broken = min({"0", "1", "2", "3"} - held)
    config = PoolConfig(backend=PACED, backend_options={"clip_s": 0.01, "broken_devices": [broken]}, workers=2)
    with GeneratorPool(config) as partial:
        assert len(partial.workers) == 1 and partial.workers[0].gpus != [broken]
        assert len(partial.failed_workers) == 1
        assert "on node " in partial.failed_workers[0] and f"no usable device {broken}" in partial.failed_workers[0]
        assert partial.submit(paced_job(inputs, "ok", 0, 1), tmp_path / "ok").result(timeout=60).attempts == 1
    everyone = PoolConfig(backend=PACED, backend_options={"broken_devices": ["0", "1", "2", "3"]}, workers=2)
    with pytest.raises(PoolError, match="no worker could start: .*no usable device"):
        GeneratorPool(everyone).start()


def test_store_on_s3_lets_a_worker_anywhere_resume_and_keeps_only_the_resume_state(
    s3_endpoint: str, inputs, tmp_path: Path
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(anon=False)
    fs.mkdir("clips")
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    config = PoolConfig(
        backend=PACED,
        backend_options={"clip_s": 0.2},
        workers=1,
        backoff_s=0.1,
        store="s3://clips/run",
        scratch_dir=str(tmp_path / "scratch"),
        env_vars=aws,
    )
    job = paced_job(inputs, "s3row", 1, 3, seed=5)
    at_kill: list[str] = []

    def on_event(event: SegmentEvent) -> None:
        # Two of three clips stored: the store holds them and clip 1's state only; then the worker dies.
        if event.kind == "clip" and event.clips_done == 2 and not at_kill:
            fs.invalidate_cache()
            at_kill.extend(sorted(Path(p).name for p in fs.find("clips/run/s3row")))
            os.kill(event.pid, signal.SIGKILL)

    with GeneratorPool(config) as store_pool:
        resumed = store_pool.submit(job, tmp_path / "driver", on_event).result(timeout=120)
    assert at_kill == ["clip_0000.mp4", "clip_0001.mp4", "clip_0001.state.zip", "segment.json"]
    # The replacement worker took the first two clips and the state from the store and went on from there.
    assert resumed.attempts == 2 and [c.reused for c in resumed.clips] == [True, True, False]
    fs.invalidate_cache()
    assert sorted(Path(p).name for p in fs.find("clips/run/s3row")) == [
        "clip_0000.mp4", "clip_0001.mp4", "clip_0002.mp4", "segment.json",
    ]  # fmt: skip
    assert len(fs.find("clips/run/inputs")) == 2  # image and audio, stored once by content
    assert all(Path(c.path).parent == tmp_path / "driver" for c in resumed.clips)
    local = stage.generate_segment(job, PacedGenerator(clip_s=0), tmp_path / "local")
    assert [Path(c.path).read_bytes() for c in resumed.clips] == [Path(c.path).read_bytes() for c in local.clips]
    assert not list((tmp_path / "scratch").rglob("clip_*"))  # worker scratch is emptied once stored
    assert not list((tmp_path / "driver").glob("*.state.*"))


def test_rendering_in_the_flow_process_does_not_import_ray() -> None:
    """Ray is in the `model` extra only: a named backend or a factory loaded without the pool must not need it."""
    code = (
        "import sys, flows.steps, tasks.generate.backends\n"
        "from flows.settings import BatchSettings\n"
        f"for backend in ('preview', {PACED!r}):\n"
        "    flows.steps.load_backend(backend, BatchSettings())\n"
        "print(sorted(name for name in sys.modules if name.partition('.')[0] == 'ray'))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]"
