"""The batch's side of the GPU pool (tasks/generate/pool.py): start it, run segments on it, report progress.

The flow process is the Ray driver; workers report to it, not to Prefect, so only this
process needs the API (docs/design-notes.md, "Generation on the pool"). A segment's
`generate` task run shows `Queued` (a Pending state) while the segment waits in the pool's
queue and `Running` once a worker renders it. Clip progress (`RowProgress`) is the same
whether the segments render on the pool or in the flow process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import get_run_logger
from prefect.artifacts import acreate_progress_artifact, acreate_table_artifact, aupdate_progress_artifact
from prefect.context import TaskRunContext
from prefect.states import Pending, Running, State

# The task engine reports its states as these events (client-side orchestration); a waiting segment's
# state is reported the same way, so the server orders it with the engine's own.
from prefect.utilities.engine import emit_task_run_state_change_event

from flows import progress
from flows.report import row_key
from flows.settings import BatchSettings
from tasks import storage
from tasks.generate.backends import BackendError
from tasks.records import ManifestRow, Plan, SegmentJob, SegmentResult

if TYPE_CHECKING:
    from tasks.generate.pool import GeneratorPool
    from tasks.generate.pool_config import SegmentEvent


@dataclass
class PoolRun:
    """A running batch's GPU pool and the gate that limits its rows in their CPU stages."""

    pool: GeneratorPool
    cpu_gate: asyncio.Semaphore


# Neither a pool nor a semaphore can be a Prefect parameter: the batch sets its PoolRun here and
# its row subflows and generate tasks, which run on the batch's event loop, inherit it.
_current: ContextVar[PoolRun | None] = ContextVar("s2v_pool_run", default=None)


def current() -> PoolRun | None:
    """The pool of the batch this code runs in; None when it renders in the flow process."""
    return _current.get()


def cpu_gate() -> contextlib.AbstractAsyncContextManager:
    """With the pool, rows take turns for their CPU stages only, so every row's segments can be queued."""
    run = current()
    return run.cpu_gate if run is not None else contextlib.nullcontext()


def use_pool(settings: BatchSettings, backend: str) -> bool:
    """'auto' renders on the pool for the model, or when a Ray cluster is named; never for a CPU device
    (`--device cpu` needs no GPU worker: the flow process renders, unless the pool is asked for)."""
    if settings.pool != "auto":
        return settings.pool == "on"
    if settings.device and not settings.device.startswith("cuda"):
        return False
    return backend == "wan-s2v" or bool(settings.ray_address or os.environ.get("RAY_ADDRESS"))


@contextlib.asynccontextmanager
async def serving(pool: GeneratorPool, cpu_gate: asyncio.Semaphore) -> AsyncIterator[PoolRun]:
    """Make `pool` this batch's for the block (its rows find it with `current`); close it afterwards."""
    run = PoolRun(pool, cpu_gate)
    token = _current.set(run)
    try:
        yield run
    finally:
        _current.reset(token)
        await asyncio.to_thread(pool.close)


async def start_pool(settings: BatchSettings, backend: str) -> GeneratorPool:
    """Start the GPU workers (each loads the model once); a missing checkpoint fails before any starts."""
    from tasks.generate.pool import GeneratorPool
    from tasks.generate.pool_config import NoWorkerStarted, PoolConfig, PoolError, PoolSettingsError

    logger = get_run_logger()
    if settings.checkpoint and not await asyncio.to_thread(storage.exists, settings.checkpoint):
        raise BackendError(f"checkpoint not found: {settings.checkpoint}")
    pool = GeneratorPool(PoolConfig(
        backend=backend, checkpoint=settings.checkpoint, device=settings.device, offload=settings.offload,
        backend_options=settings.generator_options, precision=settings.precision, workers=settings.pool_workers,
        address=settings.ray_address, attempts=settings.segment_attempts, backoff_s=settings.retry_backoff_s,
        offload_on_oom=settings.offload_on_oom, store=settings.clip_store,
        gpus_per_worker=settings.gpus_per_worker, parallel_cfg=settings.parallel_cfg,
    ))
    try:
        workers = await asyncio.to_thread(pool.start)
    except (NoWorkerStarted, PoolSettingsError) as exc:  # the model did not load, or cannot split: pool=off won't help
        raise BackendError(str(exc)) from None
    except PoolError as exc:  # no cluster or no GPUs: the flow process may still render
        raise BackendError(f"{exc} (or set pool=off to render in the flow process)") from None
    for line in pool.failed_workers:
        logger.warning("GPU worker could not start: %s", line)
    logger.info("GPU pool: %d workers: %s", len(workers), ", ".join(str(w) for w in workers))
    return pool


class RowProgress:
    """Clips done out of clips planned for one row: a Prefect progress artifact, logs, the CLI hook.

    A plain class, not a dataclass: Prefect walks dataclass parameters of tasks, and this
    object is shared by the row's generate tasks.
    """

    def __init__(self, row: ManifestRow, plan: Plan, batch_key: str):
        self.row = row
        self.plan = plan
        self.batch_key = batch_key
        self.done: dict[int, int] = {}
        self.artifact = None
        self.last_update = 0.0

    async def start(self) -> None:
        self.artifact = await acreate_progress_artifact(
            progress=0.0, key=row_key(self.batch_key, self.row.id, "clips"),
            description=f"Clips rendered for row {self.row.row} ({self.row.id}): {self.plan.total_clips} planned "
                        f"in {len(self.plan.segments)} segments",
        )

    async def clip(self, index: int, clips_done: int, clips_total: int, reused: bool = False) -> None:
        """Segment `index` has `clips_done` of its `clips_total` clips."""
        self.done[index] = clips_done  # before any await: finish() counts it even if the update is pending
        progress.emit(self.row.id, "clip", f"segment {index} clip {clips_done}/{clips_total}"
                      + (" (reused)" if reused else ""))
        await self._update(force=False)

    async def on_event(self, event: SegmentEvent) -> None:
        logger = get_run_logger()
        where = f"segment {event.segment_index}"
        if event.kind == "started":
            show_task_state(Running(message=f"attempt {event.attempt}/{event.attempts_max} on {event.worker}"))
            logger.info("%s: attempt %d/%d on %s, %d/%d clips done", where, event.attempt, event.attempts_max,
                        event.worker, event.clips_done, event.clips_total)
        elif event.kind == "clip":
            await self.clip(event.segment_index, event.clips_done, event.clips_total, event.reused)
        elif event.kind == "retry":
            show_task_state(Pending(name="Queued", message=f"attempt {event.attempt} failed; waiting for a worker"))
            logger.warning("%s: attempt %d/%d failed: %s", where, event.attempt, event.attempts_max, event.detail)
        elif event.kind == "failed":
            logger.error("%s failed after %d attempts: %s\n%s", where, event.attempt, event.detail,
                         event.traceback or "")
        elif event.kind == "done":
            logger.info("%s done on %s (attempt %d): %s", where, event.worker, event.attempt, event.detail)

    async def _update(self, force: bool) -> None:
        # Clips take minutes on a GPU but milliseconds in tests: at most one API call a second.
        if self.artifact is None or (not force and time.monotonic() - self.last_update < 1.0):
            return
        self.last_update = time.monotonic()
        done = sum(self.done.values())
        await aupdate_progress_artifact(self.artifact, round(100.0 * done / max(self.plan.total_clips, 1), 1))

    async def finish(self, results: list[SegmentResult | BaseException]) -> None:
        await self._update(force=True)
        table = []
        for i, r in enumerate(results):
            if isinstance(r, SegmentResult):
                table.append({"segment": i, "state": "completed", "clips": len(r.clips), "reused": r.reused_clips,
                              "attempts": r.attempts, "worker": r.worker or "", "gpu_s": r.gpu_s, "error": ""})
            else:
                table.append({"segment": i, "state": "failed", "clips": self.done.get(i, 0), "reused": "",
                              "attempts": getattr(r, "attempts", ""), "worker": "", "gpu_s": "", "error": str(r)})
        await acreate_table_artifact(key=row_key(self.batch_key, self.row.id, "segments"), table=table,
                                     description=f"Segments of row {self.row.row} ({self.row.id})")


async def run_segment(pool: GeneratorPool, job: SegmentJob, seg_dir: Path, tracker: RowProgress) -> SegmentResult:
    """Submit one segment and relay its events (state, attempts, clips) until it is done."""
    show_task_state(Pending(name="Queued", message="waiting for a GPU worker"))
    events: asyncio.Queue = asyncio.Queue()
    result = asyncio.ensure_future(pool.run_segment(job, seg_dir, events.put_nowait))
    while True:
        getter = asyncio.ensure_future(events.get())
        await asyncio.wait({result, getter}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            await tracker.on_event(getter.result())
        else:
            getter.cancel()
        if result.done():
            while not events.empty():
                await tracker.on_event(events.get_nowait())
            return result.result()



def show_task_state(state: State) -> None:
    """Show the running task run (a segment's `generate`) in `state` in the UI: `Queued` while its segment
    waits for a worker, `Running` while one renders it. The task's own final state follows as usual."""
    context = TaskRunContext.get()
    if context is None or context.task_run is None:
        return
    run = context.task_run
    state.state_details.task_run_id, state.state_details.flow_run_id = run.id, run.flow_run_id
    shown = run.model_copy(update={"state": state, "state_id": state.id, "state_type": state.type,
                                   "state_name": state.name})
    emit_task_run_state_change_event(task_run=shown, initial_state=run.state, validated_state=state)
