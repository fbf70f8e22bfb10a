"""The GPU worker: a Ray actor that loads one generator and renders segments on it, one at a time.

Shaped like Ray's batch-inference actors: the constructor loads the generator once (minutes
for the real model) and `run` serves segment after segment through
`tasks.generate.stage.generate_segment`, so every clip lands atomically with the lossless
state to continue from, and a retry resumes at the first missing clip. What the worker sends the driver
(tasks/generate/pool.py) is typed: a `WorkerInfo` once loaded, then per segment a `ClipDone`
per clip and a closing `SegmentDone` or `SegmentError`. Errors are sent, not raised, so they
arrive classified whether or not the exception pickles; only a dead process reaches the
driver as a Ray error.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray

from tasks.generate import mirror, stage
from tasks.generate.backends import build_generator
from tasks.generate.base import Generator
from tasks.records import DEFAULT_PRECISION, ClipResult, SegmentJob, SegmentResult


@dataclass(frozen=True)
class WorkerInfo:
    """Where a worker runs and how its generator loaded; `error` says why it could not."""

    name: str
    """The pool's name for the worker: w0, then w0.1 for the one that replaced it."""
    pid: int
    node: str
    gpus: list[str]
    offload: bool
    load_s: float
    error: str | None = None
    load: dict[str, Any] = field(default_factory=dict)
    """Where the generator's loading went (model.timing.LoadTimings.as_dict), when it says."""
    ready_at: float = 0.0
    """Unix time the generator was loaded."""
    pids: tuple[int, ...] = ()
    """Every rank's process of a worker of several GPUs (tasks/generate/group_rank.py), rank 0's first."""

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid} on {self.node}, gpu {','.join(self.gpus) or '-'})"


@dataclass(frozen=True)
class ClipDone:
    """One clip of the segment is written (and stored, with a store)."""

    clip: ClipResult


@dataclass(frozen=True)
class SegmentDone:
    result: SegmentResult
    remote: str | None
    """The segment's folder in the store, when one is used: the driver fetches the clips from there."""
    busy_s: float
    """Seconds the worker spent inside the segment."""


@dataclass(frozen=True)
class SegmentError:
    kind: Literal["oom", "missing", "error"]
    """'oom' for accelerator out-of-memory, 'missing' for vanished inputs, else 'error'."""
    error: str
    traceback: str
    busy_s: float


def classify_error(exc: BaseException) -> Literal["oom", "missing", "error"]:
    names = {c.__name__ for c in type(exc).__mro__}
    if "OutOfMemoryError" in names or "CUDA out of memory" in str(exc):
        return "oom"
    if isinstance(exc, FileNotFoundError):
        return "missing"
    return "error"


def describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"input missing: {exc.filename}"
    return f"{type(exc).__name__}: {exc}"


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))[-4000:]


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
        precision: str = DEFAULT_PRECISION,
    ):
        started = time.monotonic()
        self.precision = precision
        # A load failure is kept and reported by `info`, so the driver can name the node and the error.
        try:
            self.generator: Generator | None = build_generator(
                backend, checkpoint, device, offload, options, precision=precision
            )
            error = None
        except Exception as exc:
            self.generator = None
            error = describe(exc)
        self._info = WorkerInfo(
            name=name,
            pid=os.getpid(),
            node=ray.util.get_node_ip_address(),
            gpus=[str(g) for g in ray.get_gpu_ids()],
            offload=offload,
            load_s=round(time.monotonic() - started, 3),
            error=error,
            load=dict(getattr(self.generator, "load_timings", None) or {}),
            ready_at=round(time.time(), 3),
        )

    def info(self) -> WorkerInfo:
        return self._info

    def run(
        self, job: SegmentJob, seg_dir: str, store: str | None = None, scratch: str | None = None
    ) -> Iterator[ClipDone | SegmentDone | SegmentError]:
        """Render one segment; with a `store`, in a local scratch folder mirrored there."""
        started = time.monotonic()
        events: queue.Queue[ClipResult | tuple[SegmentResult, str | None] | BaseException] = queue.Queue()

        def render() -> None:
            try:
                if job.precision != self.precision:  # the batch validates rows against its precision
                    raise ValueError(f"the segment asks for precision {job.precision}; this worker's model runs "
                                     f"in {self.precision}")
                if store:
                    events.put(self._render_mirrored(job, store, Path(scratch or tempfile.gettempdir()), events.put))
                else:
                    events.put((stage.generate_segment(job, self.generator, Path(seg_dir), on_clip=events.put), None))
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the driver
                events.put(exc)

        # generate_segment reports clips through a callback; a thread turns them into a stream.
        threading.Thread(target=render, name=f"render-{job.row_id}-{job.segment.index}", daemon=True).start()
        while True:
            item = events.get()
            busy = round(time.monotonic() - started, 4)
            if isinstance(item, ClipResult):
                yield ClipDone(item)
            elif isinstance(item, BaseException):
                yield SegmentError(classify_error(item), describe(item), format_traceback(item), busy)
                return
            else:
                yield SegmentDone(*item, busy_s=busy)
                return

    def _render_mirrored(
        self, job: SegmentJob, store: str, scratch: Path, on_clip: Callable[[ClipResult], None]
    ) -> tuple[SegmentResult, str]:
        local_job = mirror.localize_inputs(job)
        fingerprint = stage.job_fingerprint(local_job, self.generator)
        remote = mirror.segment_uri(store, local_job, fingerprint)
        work = scratch / "s2v-segments" / job.row_id / f"seg_{job.segment.index:03d}" / fingerprint[:24]
        mirror.pull(remote, work)
        marker_stored = False

        def store_clip(clip: ClipResult) -> None:
            nonlocal marker_stored
            # A reused clip may be one this node wrote but could not upload before it was lost.
            if not (clip.reused and mirror.stored(Path(clip.path), remote)):
                if not marker_stored:
                    mirror.push(work / stage.MARKER, remote)
                    marker_stored = True
                if clip.state:
                    mirror.push(Path(clip.state), remote)
                mirror.push(Path(clip.path), remote)
            if not clip.reused:  # the store keeps only what a resume needs, as the stage does locally
                mirror.drop_states(remote, keep=Path(clip.state).name if clip.state else None)
            on_clip(clip)

        result = stage.generate_segment(local_job, self.generator, work, on_clip=store_clip)
        mirror.drop_states(remote)  # also when every clip was reused: a finished segment keeps no state
        shutil.rmtree(work, ignore_errors=True)  # everything is in the store; keep worker disks bounded
        return result, remote
