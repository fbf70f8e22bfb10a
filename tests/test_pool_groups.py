"""Pool workers of several GPUs (tasks/generate/group.py) on a real local Ray with 4 declared GPUs:
the tiny Wan2.2-S2V model on CPU, each group joined over gloo."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import av
import numpy as np
import pytest
import ray
from paced import tiny_s2v_job

from flows.settings import SettingsError, load_settings
from tasks.generate.pool import GeneratorPool
from tasks.generate.pool_config import NoWorkerStarted, PoolConfig, PoolSettingsError, SegmentEvent, SegmentFailed
from tasks.records import SegmentJob, SegmentResult

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]


def _rows(tmp_path: Path) -> tuple[str, list[SegmentJob]]:
    """The tiny checkpoint and two one-segment rows of 3 clips (other seeds: other clips)."""
    checkpoint, job = tiny_s2v_job(tmp_path)
    other = job.model_copy(update={"row_id": "tiny2", "segment": job.segment.model_copy(update={"seed": 11})})
    return checkpoint, [job, other]


def _config(checkpoint: str, **options) -> PoolConfig:
    """The tiny model on CPU workers of the local Ray."""
    return PoolConfig(backend="wan-s2v", checkpoint=checkpoint, device="cpu", **options)


def _frames(result: SegmentResult) -> np.ndarray:
    """Every decoded frame of the segment's clips, as int [T, H, W, 3]."""
    frames = []
    for clip in result.clips:
        with av.open(clip.path) as container:
            frames += [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames).astype(int)


def test_a_batch_on_two_groups_of_two_gpus_equals_single_gpu_workers(tmp_path: Path) -> None:
    checkpoint, jobs = _rows(tmp_path)
    single = _config(checkpoint, workers=1, attempts=1)
    with GeneratorPool(single) as pool:
        want = [pool.submit(j, tmp_path / "one" / j.row_id).result(timeout=300) for j in jobs]
    # two ranks each sequence parallel (the tiny model's 2 heads split over 2), not CFG parallel
    grouped = _config(checkpoint, workers=2, gpus_per_worker=2, parallel_cfg=False, attempts=1)
    with GeneratorPool(grouped) as pool:
        futures = [pool.submit(j, tmp_path / "groups" / j.row_id) for j in jobs]
        got = [f.result(timeout=300) for f in futures]
        groups = list(pool.workers)
    assert len(groups) == 2 and all(len(g.pids) == 2 and len(g.gpus) == 2 for g in groups)
    assert len({g.pids for g in groups}) == 2 and not set(groups[0].gpus) & set(groups[1].gpus)
    assert {r.worker for r in got} == {str(g) for g in groups}  # each row on its own group
    for result, expected in zip(got, want, strict=True):
        assert [c.frames for c in result.clips] == [c.frames for c in expected.clips]
        frames, reference = _frames(result), _frames(expected)
        # within a few uint8 levels: float32 rounding, magnified by the tiny random VAE (as in
        # tests/model/test_parallel.py), then through the clips' lossy encoding
        diff = np.abs(frames - reference)
        assert frames.shape == reference.shape and diff.max() <= 12 and diff.mean() < 0.5
    a, b = (_frames(r) for r in got)
    assert np.abs(a - b).mean() > 1  # the two rows' seeds give different clips


def test_a_killed_rank_replaces_the_group_and_the_segment_resumes(tmp_path: Path) -> None:
    checkpoint, (job, _) = _rows(tmp_path)
    killed: list[int] = []
    group: list = []

    def on_event(event: SegmentEvent) -> None:
        # after clip 0: kill rank 1, which rank 0 waits for in its next collective
        if event.kind == "clip" and event.clips_done == 1 and not killed:
            killed.append(group[0].pids[1])
            os.kill(group[0].pids[1], signal.SIGKILL)

    # two ranks CFG parallel (the default on an even group): one guidance branch each
    config = _config(checkpoint, workers=1, gpus_per_worker=2, backoff_s=0.1)
    with GeneratorPool(config) as pool:
        group.append(pool.workers[0])
        resumed = pool.submit(job, tmp_path / "resumed", on_event).result(timeout=300)
        clean = pool.submit(job, tmp_path / "clean").result(timeout=300)
        workers = list(pool.workers)
        free = ray.available_resources().get("GPU")
    assert killed and resumed.attempts == 2 and [c.reused for c in resumed.clips] == [True, False, False]
    assert [w.name for w in workers] == ["w0", "w0.1"] and resumed.worker == clean.worker == str(workers[1])
    assert not set(workers[0].pids) & set(workers[1].pids)
    # the new group resumed from the state rank 0 stored after clip 0, as an uninterrupted run
    for a, b in zip(resumed.clips, clean.clips, strict=True):
        assert Path(a.path).read_bytes() == Path(b.path).read_bytes()
    assert free == 2  # the new group holds 2 GPUs; the lost group's came back


def test_settings_that_cannot_split_are_refused_before_any_worker_starts(tmp_path: Path) -> None:
    checkpoint, _ = _rows(tmp_path)
    free = ray.available_resources().get("GPU")
    three = _config(checkpoint, gpus_per_worker=3)
    with pytest.raises(PoolSettingsError, match=r"3 GPUs per worker do not divide the 4 GPUs of node .*\[1, 2, 4\]"):
        GeneratorPool(three).start()
    # 4 ranks sequence parallel over the tiny model's 2 heads
    four = _config(checkpoint, gpus_per_worker=4, parallel_cfg=False)
    with pytest.raises(PoolSettingsError, match=r"gpus_per_worker=4: .* 2 attention heads must divide by the number"):
        GeneratorPool(four).start()
    assert ray.available_resources().get("GPU") == free  # no worker took a GPU
    with pytest.raises(SettingsError, match=r"mode 'distilled' runs on one GPU per worker.*set gpus_per_worker=1"):
        load_settings(mode="distilled", gpus_per_worker=2)
    assert load_settings(gpus_per_worker=2).gpus_per_worker == 2


def test_a_job_every_rank_refuses_fails_alone_and_the_group_stays_in_step(tmp_path: Path) -> None:
    checkpoint, (job, _) = _rows(tmp_path)
    distilled = job.model_copy(update={"row_id": "d", "mode": "distilled", "distilled_lora": "lora.safetensors"})
    config = _config(checkpoint, workers=1, gpus_per_worker=2, attempts=1)
    with GeneratorPool(config) as pool:
        with pytest.raises(SegmentFailed, match="distilled mode runs on one GPU: its streaming KV caches"):
            pool.submit(distilled, tmp_path / "distilled").result(timeout=300)
        # every rank failed at the same call and heard its end: the same group renders the next job
        result = pool.submit(job, tmp_path / "exact").result(timeout=300)
        assert [w.name for w in pool.workers] == ["w0"] and not pool.failed_workers
    assert result.worker == str(pool.workers[0]) and len(result.clips) == 3


def test_rank_0_failing_between_clips_fails_the_attempt_and_keeps_the_group(tmp_path: Path) -> None:
    checkpoint, (job, _) = _rows(tmp_path)
    seg_dir, away = tmp_path / "seg", tmp_path / "seg.away"
    events: list[SegmentEvent] = []

    def on_event(event: SegmentEvent) -> None:
        events.append(event)
        # after clip 0, a file where rank 0 writes the next clip: rank 0 fails between two clips,
        # the other rank (stepping with rank 0) waits for it instead of starting the next clip
        if event.kind == "clip" and event.attempt == 1 and event.clips_done == 1:
            seg_dir.rename(away)
            seg_dir.write_text("not a folder")
        elif event.kind == "retry":  # the folder back for the retry, which resumes after clip 0
            seg_dir.unlink()
            away.rename(seg_dir)

    config = _config(checkpoint, workers=1, gpus_per_worker=2, backoff_s=0.1)
    with GeneratorPool(config) as pool:
        resumed = pool.submit(job, seg_dir, on_event).result(timeout=300)
        clean = pool.submit(job, tmp_path / "clean").result(timeout=300)
        workers, failed = list(pool.workers), list(pool.failed_workers)
    retries = [e.detail for e in events if e.kind == "retry"]
    assert len(retries) == 1 and "FileExistsError" in retries[0] and "lost" not in retries[0]
    # the same group, not replaced: the attempt failed as on a single worker
    assert [w.name for w in workers] == ["w0"] and not failed and resumed.worker == clean.worker == str(workers[0])
    assert resumed.attempts == 2 and resumed.clips[0].reused and not resumed.clips[-1].reused
    for a, b in zip(resumed.clips, clean.clips, strict=True):  # the ranks stayed in step
        assert Path(a.path).read_bytes() == Path(b.path).read_bytes()


def test_a_group_that_cannot_join_is_left_out_with_its_gpus_freed() -> None:
    # every declared GPU is free once the group is gone (a count taken here could still miss the
    # GPUs an earlier test's pool is releasing)
    free = ray.cluster_resources().get("GPU")
    # the preview backend loads on every rank, but cannot split a clip: each rank's join fails
    config = PoolConfig(backend="preview", device="cpu", workers=1, gpus_per_worker=2)
    with pytest.raises(NoWorkerStarted, match=r"w0 on node .*: rank \d: ValueError: backend 'preview' cannot split"):
        GeneratorPool(config).start()
    # the group's placement group was removed (Ray frees its resources a moment later)
    assert not [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    for _ in range(300):
        if ray.available_resources().get("GPU") == free:
            break
        time.sleep(0.1)
    assert ray.available_resources().get("GPU") == free
