"""GPU pool benchmark: N workers over a batch of uneven rows, wall time against the ideal.

Runs the real pool (Ray actors, the stage writing every clip and its state) with the
`paced` generator, whose clips cost a fixed time (a sleep), on declared GPUs, so it runs
on a CPU machine. For each worker count it reports:

- wall: first submit to last segment finished (workers already started, as in a batch
  where the model load is paid once);
- ideal: total work / N, where the work is the seconds workers spent inside segments
  (fixed cost plus the stage's encoding and file writes), measured by the workers;
- nominal ideal: clips x fixed cost / N (what a free encoder would give);
- overhead per segment: worker seconds not spent inside a segment, (N x wall - work) /
  segments; it includes the idle tail at the end of the batch;
- round trip per segment: driver-side attempt time minus worker-side time (dispatch,
  event streaming, result return).

    .venv/bin/python bench/pool_bench.py --workers 2 8 --segments 200 --clip-s 0.1

`--resume-check` instead renders one segment of the tiny `wan-s2v` model (random weights,
real architecture, CPU) on a one-worker pool, kills the worker's process by pid once the
first clip is finished, lets the pool replace it and resume, and compares every clip byte
for byte with an uninterrupted run of the same segment on the pool.

    .venv/bin/python bench/pool_bench.py --resume-check

Run from the repository root: the paced generator and the jobs are test doubles (tests/paced.py),
which the pool's workers import from the driver's working folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.generate.pool import GeneratorPool  # noqa: E402
from tasks.generate.pool_config import PoolConfig, init_ray  # noqa: E402
from tasks.records import SegmentJob  # noqa: E402
from tests.paced import PACED, paced_job, tiny_s2v_job, write_inputs  # noqa: E402


def uneven_batch(folder: Path, segments: int, seed: int) -> list[SegmentJob]:
    """Rows of 1-6 segments, segments of 1-4 clips (a long tail of short ones, a few long)."""
    rng = random.Random(seed)
    inputs = write_inputs(folder)
    jobs: list[SegmentJob] = []
    row = 0
    while len(jobs) < segments:
        for index in range(min(rng.randint(1, 6), segments - len(jobs))):
            clips = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
            jobs.append(paced_job(inputs, f"row{row:03d}", index, clips, seed=row, trim=0))
        row += 1
    return jobs


def run(workers: int, jobs: list[SegmentJob], clip_s: float, work: Path) -> dict:
    config = PoolConfig(backend=PACED, backend_options={"clip_s": clip_s}, workers=workers)
    with GeneratorPool(config) as pool:
        t0 = time.monotonic()
        futures = [pool.submit(j, work / j.row_id / f"seg_{j.segment.index:03d}") for j in jobs]
        results = [f.result() for f in futures]
        wall = time.monotonic() - t0
        stats = list(pool.stats)
    busy = sum(s.busy_s for s in stats)
    clips = sum(len(r.clips) for r in results)
    ideal = busy / workers
    return {
        "workers": workers,
        "segments": len(jobs),
        "clips": clips,
        "clip_s": clip_s,
        "wall_s": round(wall, 3),
        "ideal_s": round(ideal, 3),
        "wall_over_ideal": round(wall / ideal, 4),
        "nominal_ideal_s": round(clips * clip_s / workers, 3),
        "encode_s_per_clip": round((busy - clips * clip_s) / clips, 4),
        "overhead_ms_per_segment": round(1000 * (workers * wall - busy) / len(jobs), 2),
        "round_trip_ms_per_segment": round(
            1000 * statistics.mean(s.finished - s.dispatched - s.busy_s for s in stats), 2
        ),
        "attempts": len(stats),
    }


def resume_check(folder: Path) -> dict:
    """Interrupted-and-resumed on the pool vs uninterrupted in process, with the tiny wan-s2v model."""
    import signal

    checkpoint, job = tiny_s2v_job(folder)
    killed: list[int] = []

    def on_event(event) -> None:
        if event.kind == "clip" and event.clips_done == 1 and not killed:
            killed.append(event.pid)
            os.kill(event.pid, signal.SIGKILL)

    # The reference run goes through the pool too: CPU float results depend on the thread count,
    # which Ray sets per worker (OMP_NUM_THREADS), so an in-process run is not a like-for-like reference.
    config = PoolConfig(backend="wan-s2v", checkpoint=checkpoint, device="cpu", workers=1, backoff_s=0.1)
    with GeneratorPool(config) as pool:
        resumed = pool.submit(job, folder / "pool", on_event).result()
        clean = pool.submit(job, folder / "clean").result()
    # A finished segment keeps no state: the clips after the resume show the state carried them over
    # (tests/test_generate_stage.py compares the states themselves, bit for bit).
    pairs = zip(resumed.clips, clean.clips, strict=True)
    same = [Path(a.path).read_bytes() == Path(b.path).read_bytes() for a, b in pairs]
    return {
        "killed_pid": killed[0] if killed else None,
        "attempts": resumed.attempts,
        "reused": [c.reused for c in resumed.clips],
        "clips_bitwise_equal": same,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--segments", type=int, default=200)
    parser.add_argument("--clip-s", type=float, default=0.1, help="fixed cost per clip, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--resume-check", action="store_true", help="tiny wan-s2v kill-and-resume check")
    args = parser.parse_args()
    if args.resume_check:
        init_ray(cpus=2, gpus=1)
        try:
            with tempfile.TemporaryDirectory(prefix="pool-resume-") as tmp:
                print(json.dumps(resume_check(Path(tmp))))
        finally:
            ray.shutdown()
        return

    init_ray(cpus=max(args.workers), gpus=max(args.workers))
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="pool-bench-") as tmp:
            jobs = uneven_batch(Path(tmp), args.segments, args.seed)
            for n in args.workers:
                results.append(run(n, jobs, args.clip_s, Path(tmp) / f"w{n}"))
                print(json.dumps(results[-1]), flush=True)
    finally:
        ray.shutdown()
    machine = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "ray": ray.__version__,
    }
    print("\n| workers | segments | clips | wall s | ideal s | wall/ideal | overhead ms/seg | round trip ms/seg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['workers']} | {r['segments']} | {r['clips']} | {r['wall_s']} | {r['ideal_s']} | "
            f"{r['wall_over_ideal']} | {r['overhead_ms_per_segment']} | {r['round_trip_ms_per_segment']} |"
        )
    print(f"\nmachine: {machine}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
