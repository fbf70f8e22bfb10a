"""Generation on a pool of GPU workers: one Ray actor per GPU, one queue of segments, retries.

Shape:
- `GeneratorWorker` is a Ray actor holding one GPU (`num_gpus=1`). Its constructor loads
  the generator once (minutes for the real model); `run` renders one SegmentJob into its
  segment folder through `tasks.generate.stage.generate_segment` (so every clip lands
  with its lossless state, atomically, and a retry resumes at the first missing clip)
  and streams an event per clip, then the SegmentResult.
- `GeneratorPool` lives in the driver (the flow process). Rows submit segments to it from
  any thread or event loop and await a future. One dispatcher thread runs an asyncio
  loop with one serving coroutine per worker; each takes the costliest waiting segment
  (longest first, over all rows) whenever its worker is free. Clips of a segment run in
  order on one worker; segments of one row run on several workers at once.
- Failures: a segment that raises is retried with exponential backoff up to `attempts`
  attempts in all; a worker whose process died is replaced (a new actor, the model loaded
  again) while its segment is queued again at once for any free worker; a CUDA out-of-memory error rebuilds that worker
  with offloading on and retries there; inputs that vanished fail the segment at once.
  A segment that fails every attempt fails with `SegmentFailed` carrying the last error;
  other segments and rows are not affected.

Where clips live: without a `store`, workers write straight into the driver's segment
folders, which works on a local Ray or with a filesystem shared by every node. With a
`store` (s3:// or a shared folder; tasks/generate/mirror.py), inputs and every finished
clip with its state go through the store, so a worker on any node can resume a segment
and the driver fetches the clips back for stitching.

Ray tasks are stateless, which is why the model lives in long-lived actors and the
Prefect tasks that wait on them stay thin. No Prefect import here: the flow wraps this.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import importlib
import itertools
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from tasks.generate import mirror, stage
from tasks.generate.base import Generator
from tasks.records import ClipResult, SegmentJob, SegmentResult

log = logging.getLogger(__name__)

EventKind = Literal["queued", "started", "clip", "retry", "done", "failed"]


class PoolError(Exception):
    """The pool cannot run at all: no Ray cluster, no GPUs, or no worker could load the model."""


class SegmentFailed(Exception):
    """A segment failed every attempt (or its inputs vanished); its row fails with this message."""

    def __init__(self, row_id: str, segment_index: int, attempts: int, error: str):
        noun = "attempt" if attempts == 1 else "attempts"
        super().__init__(f"segment {segment_index} failed after {attempts} {noun}: {error}")
        self.row_id = row_id
        self.segment_index = segment_index
        self.attempts = attempts
        self.error = error


@dataclass(frozen=True)
class PoolConfig:
    """What the pool runs and how hard it tries; the flow fills it from BatchSettings."""

    backend: str
    """Backend name for `load_generator` ('preview', 'wan-s2v'), or 'module:callable' for a custom
    generator factory, called as factory(checkpoint, device=, offload=, **backend_options)."""
    checkpoint: str | None = None
    device: str | None = None
    offload: bool = False
    backend_options: dict[str, Any] = field(default_factory=dict)
    workers: int | None = None
    """Number of workers; None follows the cluster's GPU count."""
    address: str | None = None
    """Ray cluster address; None uses RAY_ADDRESS if set, else starts a local Ray."""
    attempts: int = 3
    """Attempts per segment in all, the first included."""
    backoff_s: float = 5.0
    """Delay before the second attempt; doubles with each further attempt."""
    backoff_max_s: float = 120.0
    offload_on_oom: bool = True
    cpus_per_worker: float = 1.0
    start_timeout_s: float = 1800.0
    """How long a worker may take to start and load the model."""
    object_store_mb: int = 200
    store: str | None = None
    """Where segment folders are mirrored (s3://... or a shared folder) for workers on other nodes;
    None: workers write into the driver's work folder directly (local Ray or a shared filesystem)."""
    scratch_dir: str | None = None
    """Workers' local folder for segments when a store is used (default: the system temp folder)."""
    env_vars: dict[str, str] = field(default_factory=dict)
    """Environment for the workers (e.g. storage credentials or endpoints), through Ray's runtime_env."""
    """Object store of a local Ray: only small records travel through it."""


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    pid: int
    node: str
    gpus: list[str]
    offload: bool
    load_s: float

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid} on {self.node}, gpu {','.join(self.gpus) or '-'})"


@dataclass(frozen=True)
class SegmentEvent:
    """What happened to one segment; delivered to the submitter's `on_event`."""

    kind: EventKind
    row_id: str
    segment_index: int
    attempt: int
    attempts_max: int
    clips_done: int
    clips_total: int
    worker: str | None = None
    pid: int | None = None
    """Process id of the worker the event happened on."""
    detail: str = ""
    reused: bool = False
    """For 'clip': the clip was found finished on disk rather than generated."""
    traceback: str = ""
    """For 'retry' and 'failed' after an error raised in the worker: where it was raised."""


@dataclass
class AttemptStat:
    """One attempt as the benchmark and the report see it (monotonic clock of the driver)."""

    row_id: str
    segment_index: int
    attempt: int
    worker: str
    outcome: str
    dispatched: float
    finished: float
    busy_s: float
    """Seconds the worker spent inside the attempt (its own clock); 0 when the worker was lost."""


# --------------------------------------------------------------------------------------------
# Worker side


def build_generator(
    backend: str, checkpoint: str | None, device: str | None, offload: bool, options: dict[str, Any]
) -> Generator:
    """A backend by name through `load_generator`, or a 'module:callable' factory."""
    if ":" in backend:
        module, _, attr = backend.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        return factory(checkpoint, device=device, offload=offload, **options)
    from tasks.generate.backends import load_generator

    return load_generator(backend, checkpoint, device=device, offload=offload)


def classify_error(exc: BaseException) -> str:
    """'oom' for accelerator out-of-memory, 'missing' for vanished inputs, else 'error'."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "OutOfMemoryError" in names or "CUDA out of memory" in str(exc):
        return "oom"
    if isinstance(exc, FileNotFoundError):
        return "missing"
    return "error"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"input missing: {exc.filename}"
    return f"{type(exc).__name__}: {exc}"


class GeneratorWorker:
    """Ray actor body: one generator loaded once, serving segments one at a time."""

    def __init__(
        self,
        name: str,
        backend: str,
        checkpoint: str | None,
        device: str | None,
        offload: bool,
        options: dict[str, Any],
    ):
        self.name = name
        self.offload = offload
        self.pid = os.getpid()
        self.node = ray.util.get_node_ip_address()
        self.gpus = [str(g) for g in ray.get_gpu_ids()]
        started = time.monotonic()
        # A load failure is kept and reported by `info`, so the driver can name the node and the error.
        try:
            self.generator: Generator | None = build_generator(backend, checkpoint, device, offload, options)
            self.error = None
        except Exception as exc:
            self.generator = None
            self.error = _describe(exc)
        self.load_s = time.monotonic() - started

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "node": self.node,
            "gpus": self.gpus,
            "offload": self.offload,
            "load_s": round(self.load_s, 3),
            "error": self.error,
        }

    def run(
        self, job_json: str, seg_dir: str, store: str | None = None, scratch: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Render one segment; yields {'kind': 'clip'} per clip, then 'done' or 'error'.

        Errors are yielded, not raised, so they arrive classified and without depending on
        the exception pickling; only a dead process reaches the driver as a Ray error.
        With a `store`, the segment is rendered in a local scratch folder mirrored there.
        """
        job = SegmentJob.model_validate_json(job_json)
        started = time.monotonic()
        events: queue.Queue = queue.Queue()

        def render() -> None:
            try:
                if store:
                    result, remote = self._render_mirrored(job, store, Path(scratch or tempfile.gettempdir()), events)
                else:
                    result = stage.generate_segment(
                        job, self.generator, Path(seg_dir), on_clip=lambda c: events.put(("clip", c))
                    )
                    remote = None
                events.put(("done", (result, remote)))
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the driver
                events.put(("error", exc))

        # generate_segment reports clips through a callback; a thread turns them into a stream.
        threading.Thread(target=render, name=f"render-{job.row_id}-{job.segment.index}", daemon=True).start()
        while True:
            kind, value = events.get()
            busy = round(time.monotonic() - started, 4)
            if kind == "clip":
                yield {"kind": "clip", "clip": value.model_dump(mode="json")}
            elif kind == "done":
                result, remote = value
                yield {"kind": "done", "result": result.model_dump(mode="json"), "remote": remote, "busy_s": busy}
                return
            else:
                tb = "".join(traceback.format_exception(value))[-4000:]
                yield {
                    "kind": "error",
                    "class": classify_error(value),
                    "error": _describe(value),
                    "traceback": tb,
                    "busy_s": busy,
                }
                return

    def _render_mirrored(
        self, job: SegmentJob, store: str, scratch: Path, events: queue.Queue
    ) -> tuple[SegmentResult, str]:
        local_job = mirror.localize_inputs(job)
        fingerprint = stage.job_fingerprint(local_job, self.generator)
        remote = mirror.segment_uri(store, local_job, fingerprint)
        work = scratch / "s2v-segments" / job.row_id / f"seg_{job.segment.index:03d}" / fingerprint[:24]
        mirror.pull(remote, work)
        marker_stored = False

        def on_clip(clip: ClipResult) -> None:
            nonlocal marker_stored
            # A reused clip may be one this node wrote but could not upload before it was lost.
            if clip.reused and mirror.stored(Path(clip.path), remote):
                events.put(("clip", clip))
                return
            if not marker_stored:
                mirror.push(work / stage.MARKER, remote)
                marker_stored = True
            if clip.state:
                mirror.push(Path(clip.state), remote)
            mirror.push(Path(clip.path), remote)
            events.put(("clip", clip))

        result = stage.generate_segment(local_job, self.generator, work, on_clip=on_clip)
        shutil.rmtree(work, ignore_errors=True)  # everything is in the store; keep worker disks bounded
        return result, remote


# --------------------------------------------------------------------------------------------
# Driver side


@dataclass
class _Pending:
    job: SegmentJob
    job_json: str
    seg_dir: str
    future: concurrent.futures.Future
    on_event: Callable[[SegmentEvent], None] | None
    attempts: int = 0
    clips_done: int = 0
    held_s: float = 0.0
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
    actor: Any = None
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
        self._wakeup: asyncio.Condition | None = None
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
        self._connect()
        n = self.config.workers or int(ray.cluster_resources().get("GPU", 0))
        if n < 1:
            raise PoolError(
                "the Ray cluster has no GPUs; set S2V_POOL_WORKERS to run on declared "
                "GPU resources (a CPU machine can declare fake GPUs for CPU backends)"
            )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s2v-pool", daemon=True)
        self._thread.start()
        self._call(self._init_async()).result()
        slots = [_Slot(index=i, offload=self.config.offload) for i in range(n)]
        results = self._call(_gather(*(self._launch(s) for s in slots))).result()
        self._slots = [s for s, ok in zip(slots, results, strict=True) if ok]
        if not self._slots:
            self.close()
            raise PoolError("no worker could start: " + "; ".join(self.failed_workers))
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
            if slot.actor is not None:
                ray.kill(slot.actor, no_restart=True)
        if self._started_ray:
            ray.shutdown()

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        # Ray would report usage statistics to its servers by default; a batch tool should not.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = self.config.address or os.environ.get("RAY_ADDRESS")
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if address:
            try:
                ray.init(address=address, **quiet)
            except Exception as exc:  # Ray raises ConnectionError, RuntimeError or its own types
                raise PoolError(
                    f"cannot reach the Ray cluster at {address} (set by S2V_RAY_ADDRESS or RAY_ADDRESS): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                ) from None
        else:
            # Bound Ray's own log files on a local cluster (defaults: 512 MB x 5 per process).
            os.environ.setdefault("RAY_ROTATION_MAX_BYTES", str(16 * 1024 * 1024))
            os.environ.setdefault("RAY_ROTATION_BACKUP_COUNT", "1")
            gpus = self.config.workers  # None lets Ray detect real GPUs
            cpus = max(os.cpu_count() or 1, int((gpus or 0) * self.config.cpus_per_worker + 0.999))
            # A local cluster talks over loopback only, not over the machine's network address.
            ray.init(num_cpus=cpus, num_gpus=gpus, object_store_memory=self.config.object_store_mb * 1024**2,
                     _node_ip_address="127.0.0.1", **quiet)
        self._started_ray = True

    def _call(self, coro) -> concurrent.futures.Future:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _init_async(self) -> None:
        self._wakeup = asyncio.Condition()

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
        pending = _Pending(
            job=job, job_json=job.model_dump_json(), seg_dir=str(seg_dir), future=future, on_event=on_event
        )
        self._call(self._accept(pending))
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
                job = await asyncio.get_running_loop().run_in_executor(
                    None, mirror.store_inputs, p.job, self.config.store
                )
            except OSError as exc:
                p.last_error = _describe(exc)
                self._fail(p, None)
                return
            p.job, p.job_json = job, job.model_dump_json()
        await self._put(p)

    async def _put(self, p: _Pending) -> None:
        if self._fatal:
            self._finish(p, PoolError(self._fatal))
            return
        heapq.heappush(self._heap, (-p.cost(), next(self._seq), p))
        self._emit(p, "queued", None)
        assert self._wakeup is not None
        async with self._wakeup:
            self._wakeup.notify()

    async def _take(self) -> _Pending:
        assert self._wakeup is not None
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
                except Exception as exc:  # a Ray or pool error outside the worker's own reporting
                    p = await self._unexpected(slot, p, exc)
                if slot.actor is None:  # the worker could not be replaced: this slot is done
                    if p is not None:
                        await self._put(p)
                    await self._slot_lost()
                    return

    async def _attempt(self, slot: _Slot, p: _Pending) -> _Pending | None:
        """Run one attempt; returns the segment when it must be retried on this same worker."""
        p.attempts += 1
        info = slot.info
        worker = str(info)
        self._emit(p, "started", info, f"attempt {p.attempts}/{self.config.attempts} on {worker}")
        dispatched = time.monotonic()
        outcome: dict[str, Any] | None = None
        lost: str | None = None
        try:
            stream = slot.actor.run.options(num_returns="streaming").remote(
                p.job_json, p.seg_dir, self.config.store, self.config.scratch_dir
            )
            async for ref in stream:
                event = await ref
                if event["kind"] == "clip":
                    clip = ClipResult.model_validate(event["clip"])
                    p.clips_done = clip.index + 1
                    self._emit(p, "clip", info, reused=clip.reused)
                else:
                    outcome = event
        except RayActorError as exc:
            lost = str(exc).splitlines()[0]
        finished = time.monotonic()
        p.held_s += finished - dispatched
        busy = outcome["busy_s"] if outcome else 0.0
        kind = "lost" if lost else outcome["kind"] if outcome else "lost"
        self.stats.append(
            AttemptStat(
                p.job.row_id,
                p.job.segment.index,
                p.attempts,
                slot.name,
                outcome["class"] if kind == "error" else kind,
                dispatched,
                finished,
                busy,
            )
        )

        if kind == "done":
            result = SegmentResult.model_validate(outcome["result"])
            if outcome["remote"]:
                try:
                    result = await asyncio.get_running_loop().run_in_executor(
                        None, _fetch_clips, result, outcome["remote"], Path(p.seg_dir)
                    )
                except OSError as exc:
                    outcome = {
                        "kind": "error",
                        "class": "error",
                        "error": f"fetching clips: {_describe(exc)}",
                        "traceback": "",
                    }
                    kind = "error"
        if kind == "done":
            result = result.model_copy(update={"attempts": p.attempts, "worker": worker, "gpu_s": round(p.held_s, 3)})
            self._emit(p, "done", info, f"{len(result.clips)} clips, {result.reused_clips} reused")
            self._finish(p, result)
            return None

        if kind == "lost":
            p.last_error = f"worker {worker} was lost: {lost or 'no result'}"
            p.last_traceback = ""
            if p.attempts >= self.config.attempts:
                self._fail(p, info)
            else:
                # Queued again at once: any free worker may take it, resuming at its first missing clip,
                # while this slot starts a new worker (loading the model takes minutes).
                self._emit(p, "retry", info, p.last_error + "; queued again, replacing the worker")
                await self._put(p)
            await self._replace(slot, slot.offload)
            return None

        p.last_error = outcome["error"]
        p.last_traceback = outcome.get("traceback", "")
        log.debug("segment %s/%s attempt %d: %s", p.job.row_id, p.job.segment.index, p.attempts, outcome["traceback"])
        if outcome["class"] == "missing" or p.attempts >= self.config.attempts:
            self._fail(p, info)
            return None
        if outcome["class"] == "oom" and self.config.offload_on_oom and not slot.offload:
            # A fresh process with offloading on: an OOM leaves the CUDA allocator fragmented.
            self._emit(p, "retry", info, f"{p.last_error}; restarting {slot.name} with offloading")
            await self._replace(slot, True)
            return p  # retried here, or requeued by _serve if the worker could not be rebuilt
        delay = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (p.attempts - 1))
        self._emit(p, "retry", info, f"{p.last_error}; retry in {delay:.1f}s")
        asyncio.get_running_loop().call_later(delay, lambda: asyncio.ensure_future(self._put(p)))
        return None

    async def _unexpected(self, slot: _Slot, p: _Pending, exc: Exception) -> _Pending | None:
        """Settle an attempt that ended in an exception no branch expected: retry later, or fail."""
        p.last_error = _describe(exc)
        p.last_traceback = "".join(traceback.format_exception(exc))[-4000:]
        log.debug(
            "segment %s/%s attempt %d failed unexpectedly", p.job.row_id, p.job.segment.index, p.attempts, exc_info=exc
        )
        if p.attempts >= self.config.attempts:
            self._fail(p, slot.info)
            return None
        delay = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (p.attempts - 1))
        self._emit(p, "retry", slot.info, f"{p.last_error}; retry in {delay:.1f}s")
        asyncio.get_running_loop().call_later(delay, lambda: asyncio.ensure_future(self._put(p)))
        return None

    async def _launch(self, slot: _Slot) -> bool:
        """Start the slot's actor and wait for its model; False (and a note) when it cannot."""
        cfg = self.config
        actor = (
            _remote_worker()
            .options(
                num_gpus=1,
                num_cpus=cfg.cpus_per_worker,
                max_restarts=0,
                runtime_env={"env_vars": dict(cfg.env_vars)} if cfg.env_vars else None,
            )
            .remote(slot.name, cfg.backend, cfg.checkpoint, cfg.device, slot.offload, dict(cfg.backend_options))
        )
        try:
            info = await asyncio.wait_for(_await(actor.info.remote()), cfg.start_timeout_s)
        except (RayActorError, TimeoutError, GetTimeoutError) as exc:
            ray.kill(actor, no_restart=True)
            reason = "no free GPU in time" if isinstance(exc, TimeoutError | GetTimeoutError) else str(exc)
            self.failed_workers.append(f"{slot.name}: {reason.splitlines()[0]}")
            return False
        if info["error"]:
            ray.kill(actor, no_restart=True)
            self.failed_workers.append(f"{slot.name} on node {info['node']}: {info['error']}")
            return False
        slot.actor = actor
        slot.info = WorkerInfo(**{k: v for k, v in info.items() if k != "error"})
        return True

    async def _replace(self, slot: _Slot, offload: bool) -> bool:
        if slot.actor is not None:
            ray.kill(slot.actor, no_restart=True)
        slot.actor, slot.info = None, None
        slot.generation += 1
        slot.offload = offload
        if await self._launch(slot):
            self.workers.append(slot.info)
            return True
        return False

    async def _slot_lost(self) -> None:
        self._slots = [s for s in self._slots if s.actor is not None]
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

    def summary(self) -> dict[str, Any]:
        """Workers and attempts so far, for logs and benchmarks."""
        return {
            "workers": [asdict(w) for w in self.workers],
            "failed_workers": list(self.failed_workers),
            "attempts": [asdict(s) for s in self.stats],
        }


def _fetch_clips(result: SegmentResult, remote: str, seg_dir: Path) -> SegmentResult:
    """Bring a mirrored segment's clips into the driver's segment folder (for stitching)."""
    mirror.pull(remote, seg_dir)
    clips = [
        c.model_copy(
            update={
                "path": str(seg_dir / Path(c.path).name),
                "state": str(seg_dir / Path(c.state).name) if c.state else None,
            }
        )
        for c in result.clips
    ]
    return result.model_copy(update={"clips": clips})


async def _gather(*coros) -> list:
    return await asyncio.gather(*coros)


async def _await(ref: Any) -> Any:
    return await ref


_remote_class: Any = None


def _remote_worker() -> Any:
    # One remote class per process: Ray exports a class definition each time one is made.
    global _remote_class
    if _remote_class is None:
        _remote_class = ray.remote(GeneratorWorker)
    return _remote_class
