"""Generation on a pool of GPU workers: the driver's side, one queue of segments over one Ray actor per GPU.

Shape:
- Each worker is a `tasks.generate.worker.GeneratorWorker` actor holding one GPU
  (`num_gpus=1`): it loads the generator once and renders segments, streaming a record per
  clip and then the segment's result or error. With `gpus_per_worker` N > 1 a worker is a
  group of N such ranks on one node splitting each clip (tasks/generate/group.py); the pool
  sees both through `group.Worker`, and a segment always runs on one worker.
- `GeneratorPool` lives in the driver (the flow process). Rows submit segments to it from
  any thread or event loop and await a future. One dispatcher thread runs an asyncio
  loop with one serving coroutine per worker; each takes the costliest waiting segment
  (longest first, over all rows) whenever its worker is free. Clips of a segment run in
  order on one worker; segments of one row run on several workers at once.
- Failures: a segment that raises is retried with exponential backoff up to `attempts`
  attempts in all; a worker whose process died is replaced (a new actor, the model loaded
  again) while its segment is queued again at once for any free worker; a CUDA out-of-memory
  error rebuilds that worker with offloading on and retries there; inputs that vanished fail
  the segment at once. A segment that fails every attempt fails with `SegmentFailed` carrying
  the last error; other segments and rows are not affected.

Where clips live: without a `store`, workers write straight into the driver's segment
folders, which works on a local Ray or with a filesystem shared by every node. With a
`store` (s3:// or a shared folder; tasks/generate/mirror.py), inputs, every finished
clip and the state to continue from go through the store, so a worker on any node can
resume a segment and the driver fetches the clips back for stitching.

A segment's `gpu_s` is the time its attempts held a worker, from dispatch to outcome as the
driver sees it, lost workers included (tasks/records.py, `GPU_SECONDS`): the same quantity
the flow measures when it renders in its own process.

Ray tasks are stateless, which is why the model lives in long-lived actors and the
Prefect tasks that wait on them stay thin. No Prefect import here: the flow wraps this. What
the pool is given and reports (`PoolConfig`, its errors, `SegmentEvent`, `AttemptStat`,
`init_ray`) lives in tasks/generate/pool_config.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray

from tasks.generate import mirror
from tasks.generate.group import Worker, WorkerLost, check_layout, make_worker
from tasks.generate.pool_config import (
    AttemptStat,
    EventKind,
    NoWorkerStarted,
    PoolConfig,
    PoolError,
    PoolSettingsError,
    SegmentEvent,
    SegmentFailed,
    init_ray,
)
from tasks.generate.worker import ClipDone, SegmentDone, SegmentError, WorkerInfo, describe, format_traceback
from tasks.records import SegmentJob, SegmentResult

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    job: SegmentJob
    seg_dir: str
    future: concurrent.futures.Future
    on_event: Callable[[SegmentEvent], None] | None
    attempts: int = 0
    clips_done: int = 0
    held_s: float = 0.0
    """Seconds the segment's attempts held a worker so far (its GPU seconds)."""
    last_error: str = ""
    last_traceback: str = ""

    def cost(self) -> float:
        """Work left: the plan's estimate (or clip count) scaled to the clips not yet done."""
        seg = self.job.segment
        whole = seg.est_gpu_s if seg.est_gpu_s else float(seg.clips)
        return whole * (seg.clips - self.clips_done) / max(seg.clips, 1)


@dataclass
class _Slot:
    index: int
    offload: bool
    worker: Worker | None = None
    info: WorkerInfo | None = None
    generation: int = 0

    @property
    def name(self) -> str:
        return f"w{self.index}" + (f".{self.generation}" if self.generation else "")


class GeneratorPool:
    """Driver-side pool of generator workers; see the module docstring.

    Use as a context manager, or call `start()` and `close()`. `submit` is thread-safe.
    """

    def __init__(self, config: PoolConfig):
        self.config = config
        self.workers: list[WorkerInfo] = []
        self.failed_workers: list[str] = []
        """One line per worker that could not start: its node and error."""
        self.stats: list[AttemptStat] = []
        self._slots: list[_Slot] = []
        self._heap: list[tuple[float, int, _Pending]] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Condition()  # bound to the pool's loop on first use
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._serving: list[concurrent.futures.Future] = []
        self._started_ray = False
        self._closed = False
        self._fatal: str | None = None
        self._pending: dict[int, _Pending] = {}

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> GeneratorPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> list[WorkerInfo]:
        """Connect to (or start) Ray, start the workers and wait until each loaded its model.

        Workers that fail to load are listed in `failed_workers` and left out; raises
        PoolError when none is left.
        """
        cfg = self.config
        if not ray.is_initialized():
            gpus = cfg.workers * cfg.gpus_per_worker if cfg.workers else None
            cpus = max(os.cpu_count() or 1, int((gpus or 0) * cfg.cpus_per_worker + 0.999))
            init_ray(cfg.address or os.environ.get("RAY_ADDRESS"), cpus=cpus, gpus=gpus,
                     object_store_mb=cfg.object_store_mb)
            self._started_ray = True
        try:
            return self._start_workers()
        except BaseException:  # refused settings, no worker, or an unexpected error: free the GPUs (and Ray)
            self.close()
            raise

    def _start_workers(self) -> list[WorkerInfo]:
        cfg = self.config
        n = cfg.workers or int(ray.cluster_resources().get("GPU", 0)) // cfg.gpus_per_worker
        if cfg.gpus_per_worker > 1:
            nodes = {node["NodeManagerAddress"]: int(node["Resources"].get("GPU", 0)) for node in ray.nodes()
                     if node["Alive"] and node["Resources"].get("GPU")}
            try:
                check_layout(cfg, nodes)
            except ValueError as exc:
                raise PoolSettingsError(f"gpus_per_worker={cfg.gpus_per_worker}: {exc}") from None
        if n < 1:
            raise PoolError(
                "the Ray cluster has no GPUs; set S2V_POOL_WORKERS to run on declared "
                "GPU resources (a CPU machine can declare fake GPUs for CPU backends)"
            )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s2v-pool", daemon=True)
        self._thread.start()
        slots = [_Slot(index=i, offload=cfg.offload) for i in range(n)]
        self._slots = slots  # close() stops what started, should anything below raise
        results = self._call(_gather(*(self._launch(s) for s in slots))).result()
        for slot, ok in zip(slots, results, strict=True):
            if isinstance(ok, BaseException):  # the worker was killed; its note is the error
                self.failed_workers.append(f"{slot.name}: {describe(ok)}")
        self._slots = [s for s, ok in zip(slots, results, strict=True) if ok is True]
        if not self._slots:
            raise NoWorkerStarted("no worker could start: " + "; ".join(self.failed_workers))
        self.workers = [s.info for s in self._slots if s.info]
        for slot in self._slots:
            self._serving.append(self._call(self._serve(slot)))
        return list(self.workers)

    def close(self) -> None:
        """Stop the workers (their GPUs are freed) and, if this pool started Ray, Ray too."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            for fut in self._serving:
                fut.cancel()
            self._call(self._fail_all("the pool was closed")).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
        for slot in self._slots:
            if slot.worker is not None:
                slot.worker.kill()
        if self._started_ray:
            ray.shutdown()

    def _call(self, coro) -> concurrent.futures.Future:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- submitting -----------------------------------------------------------------------

    def submit(
        self, job: SegmentJob, seg_dir: str | Path, on_event: Callable[[SegmentEvent], None] | None = None
    ) -> concurrent.futures.Future:
        """Queue one segment; the future resolves to its SegmentResult or raises SegmentFailed/PoolError.

        `on_event` is called on the pool's thread: keep it short and thread-safe (see `run_segment`).
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._closed or self._loop is None:
            future.set_exception(PoolError("the pool is not running"))
            return future
        self._call(self._accept(_Pending(job=job, seg_dir=str(seg_dir), future=future, on_event=on_event)))
        return future

    async def run_segment(
        self, job: SegmentJob, seg_dir: str | Path, on_event: Callable[[SegmentEvent], None] | None = None
    ) -> SegmentResult:
        """Submit and await from any event loop; `on_event` runs on the caller's loop."""
        loop = asyncio.get_running_loop()
        relay = None
        if on_event is not None:

            def relay(event: SegmentEvent) -> None:
                loop.call_soon_threadsafe(on_event, event)

        return await asyncio.wrap_future(self.submit(job, seg_dir, relay), loop=loop)

    # -- dispatching (runs on the pool's loop) --------------------------------------------

    async def _accept(self, p: _Pending) -> None:
        self._pending[id(p)] = p
        if self.config.store:
            # Workers on other nodes read the inputs from the store, not from this machine.
            try:
                p.job = await asyncio.get_running_loop().run_in_executor(
                    None, mirror.store_inputs, p.job, self.config.store
                )
            except OSError as exc:
                p.last_error = describe(exc)
                self._fail(p, None)
                return
        await self._put(p)

    async def _put(self, p: _Pending) -> None:
        if self._fatal:
            self._finish(p, PoolError(self._fatal))
            return
        heapq.heappush(self._heap, (-p.cost(), next(self._seq), p))
        self._emit(p, "queued", None)
        async with self._wakeup:
            self._wakeup.notify()

    async def _take(self) -> _Pending:
        async with self._wakeup:
            await self._wakeup.wait_for(lambda: bool(self._heap))
            return heapq.heappop(self._heap)[2]

    async def _serve(self, slot: _Slot) -> None:
        """One worker's loop: take the costliest waiting segment, run it, settle the outcome."""
        while True:
            p = await self._take()
            while p is not None:
                try:
                    p = await self._attempt(slot, p)
                    if slot.worker is not None and slot.worker.broken:  # its segment was done: no retry
                        log.warning("replacing %s before its next segment: %s", slot.info, slot.worker.broken)
                        await self._replace(slot, slot.offload)
                except Exception as exc:  # a Ray or pool error outside the worker's own reporting
                    p.last_error, p.last_traceback = describe(exc), format_traceback(exc)
                    log.debug("segment %s/%s attempt %d failed unexpectedly", p.job.row_id, p.job.segment.index,
                              p.attempts, exc_info=exc)
                    self._retry_later(p, slot.info)
                    p = None
                if slot.worker is None:  # the worker could not be replaced: this slot is done
                    if p is not None:
                        await self._put(p)
                    await self._slot_lost()
                    return

    async def _attempt(self, slot: _Slot, p: _Pending) -> _Pending | None:
        """Run one attempt; returns the segment when it must be retried on this same worker."""
        p.attempts += 1
        info = slot.info
        self._emit(p, "started", info, f"attempt {p.attempts}/{self.config.attempts} on {info}")
        dispatched = time.monotonic()
        outcome: SegmentDone | SegmentError | None = None
        lost: str | None = None
        try:
            async for record in slot.worker.run(p.job, p.seg_dir, self.config.store, self.config.scratch_dir):
                if isinstance(record, ClipDone):
                    p.clips_done = record.clip.index + 1
                    self._emit(p, "clip", info, reused=record.clip.reused)
                else:
                    outcome = record
        except WorkerLost as exc:
            lost = str(exc)
        finished = time.monotonic()
        p.held_s += finished - dispatched
        if lost:
            outcome = None
        how = "lost" if outcome is None else "done" if isinstance(outcome, SegmentDone) else outcome.kind
        busy = outcome.busy_s if outcome else 0.0
        self.stats.append(
            AttemptStat(p.job.row_id, p.job.segment.index, p.attempts, slot.name, how, dispatched, finished, busy)
        )
        if outcome is None:
            await self._lost(slot, p, lost or "no result")
            return None

        if isinstance(outcome, SegmentDone):
            try:
                result = outcome.result
                if outcome.remote:
                    result = await asyncio.get_running_loop().run_in_executor(
                        None, _fetch_clips, result, outcome.remote, Path(p.seg_dir)
                    )
            except OSError as exc:
                outcome = SegmentError("error", f"fetching clips: {describe(exc)}", "", busy)
            else:
                result = result.model_copy(update={"attempts": p.attempts, "worker": str(info),
                                                   "gpu_s": round(p.held_s, 3)})
                self._emit(p, "done", info, f"{len(result.clips)} clips, {result.reused_clips} reused")
                self._finish(p, result)
                return None

        p.last_error, p.last_traceback = outcome.error, outcome.traceback
        log.debug("segment %s/%s attempt %d: %s", p.job.row_id, p.job.segment.index, p.attempts, outcome.traceback)
        if outcome.kind == "missing":
            self._fail(p, info)
        elif (outcome.kind == "oom" and self.config.offload_on_oom and not slot.offload
              and p.attempts < self.config.attempts):
            # A fresh process with offloading on: an OOM leaves the CUDA allocator fragmented.
            self._emit(p, "retry", info, f"{p.last_error}; restarting {slot.name} with offloading")
            await self._replace(slot, True)
            return p  # retried here, or requeued by _serve if the worker could not be rebuilt
        else:
            self._retry_later(p, info)
        return None

    def _retry_later(self, p: _Pending, info: WorkerInfo | None) -> None:
        """Queue the segment again after an exponential backoff, or fail it once its attempts are spent."""
        if p.attempts >= self.config.attempts:
            self._fail(p, info)
            return
        delay = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (p.attempts - 1))
        self._emit(p, "retry", info, f"{p.last_error}; retry in {delay:.1f}s")
        asyncio.get_running_loop().call_later(delay, lambda: asyncio.ensure_future(self._put(p)))

    async def _lost(self, slot: _Slot, p: _Pending, reason: str) -> None:
        """The worker's process died: the segment goes back to the queue and the worker is replaced."""
        p.last_error, p.last_traceback = f"worker {slot.info} was lost: {reason}", ""
        if p.attempts >= self.config.attempts:
            self._fail(p, slot.info)
        else:
            # Queued again at once: any free worker may take it, resuming at its first missing clip,
            # while this slot starts a new worker (loading the model takes minutes).
            self._emit(p, "retry", slot.info, p.last_error + "; queued again, replacing the worker")
            await self._put(p)
        await self._replace(slot, slot.offload)

    async def _replace(self, slot: _Slot, offload: bool) -> None:
        # A new actor rather than Ray's own restarts (max_restarts): a restart reruns the constructor
        # with the same arguments (an OOM needs offloading on), and a process that dies while loading
        # (e.g. killed for host memory) is restarted in a loop until start_timeout_s, where a failed
        # start here leaves the worker out at once.
        slot.worker.kill()
        slot.worker, slot.info = None, None
        slot.generation += 1
        slot.offload = offload
        if await self._launch(slot):
            self.workers.append(slot.info)

    async def _launch(self, slot: _Slot) -> bool:
        """Start the slot's worker and wait for its model; False (and a note) when it cannot."""
        worker = make_worker(slot.name, slot.offload, self.config)
        note: str | None = "did not start"
        try:
            note = await worker.start()
        finally:  # a note, an unexpected error or a cancelled start: free what it holds
            if note is not None:
                worker.kill()
        if note is None:
            slot.worker, slot.info = worker, worker.info
            return True
        self.failed_workers.append(note)
        return False

    async def _slot_lost(self) -> None:
        self._slots = [s for s in self._slots if s.worker is not None]
        if not self._slots:
            self._fatal = "no GPU worker left: " + "; ".join(self.failed_workers)
            await self._fail_all(self._fatal)

    async def _fail_all(self, reason: str) -> None:
        """Fail every unfinished segment: queued, waiting for a retry, or in flight."""
        self._heap.clear()
        for p in list(self._pending.values()):
            self._finish(p, PoolError(reason))

    def _fail(self, p: _Pending, info: WorkerInfo | None) -> None:
        self._emit(p, "failed", info, p.last_error)
        self._finish(p, SegmentFailed(p.job.row_id, p.job.segment.index, p.attempts, p.last_error))

    def _finish(self, p: _Pending, outcome: SegmentResult | BaseException) -> None:
        self._pending.pop(id(p), None)
        if p.future.done():
            return
        if isinstance(outcome, BaseException):
            p.future.set_exception(outcome)
        else:
            p.future.set_result(outcome)

    def _emit(
        self, p: _Pending, kind: EventKind, info: WorkerInfo | None, detail: str = "", *, reused: bool = False
    ) -> None:
        if p.on_event is None:
            return
        event = SegmentEvent(
            kind=kind,
            row_id=p.job.row_id,
            segment_index=p.job.segment.index,
            attempt=p.attempts,
            attempts_max=self.config.attempts,
            clips_done=p.clips_done,
            clips_total=p.job.segment.clips,
            worker=str(info) if info else None,
            pid=info.pid if info else None,
            detail=detail,
            reused=reused,
            traceback=p.last_traceback if kind in ("retry", "failed") else "",
        )
        try:
            p.on_event(event)
        except Exception:  # a listener's bug must not stop the dispatcher
            log.exception("segment event listener failed")


def _fetch_clips(result: SegmentResult, remote: str, seg_dir: Path) -> SegmentResult:
    """Bring a mirrored segment's clips into the driver's segment folder (for stitching)."""
    mirror.pull(remote, seg_dir)
    clips = [c.model_copy(update={"path": str(seg_dir / Path(c.path).name)}) for c in result.clips]
    return result.model_copy(update={"clips": clips})


async def _gather(*coros) -> list:
    return await asyncio.gather(*coros, return_exceptions=True)
