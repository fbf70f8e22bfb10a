"""What the pool (tasks/generate/pool.py) is given and gives back: its settings, its errors, the
events and attempt records it reports, and the connection to Ray it starts from.

Kept apart from the dispatcher so callers (the flow, the benchmark, the tests) name the pool's
vocabulary without reading its scheduling, and so group.py can type its settings without
importing the pool.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import ray

from tasks.records import DEFAULT_PRECISION

EventKind = Literal["queued", "started", "clip", "retry", "done", "failed"]


class PoolError(Exception):
    """The pool cannot run at all: no Ray cluster, no GPUs, or no worker could load the model."""


class PoolSettingsError(PoolError):
    """The pool's settings do not fit the cluster or the model (gpus_per_worker); refused before any worker starts."""


class NoWorkerStarted(PoolError):
    """Every worker failed to load the model (a checkpoint or device problem the flow process would share)."""


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
    """Backend name ('preview', 'wan-s2v'), or 'module:callable' for a custom generator factory,
    called as factory(checkpoint, device=, offload=, **backend_options); see `build_generator`."""
    checkpoint: str | None = None
    device: str | None = None
    offload: bool = False
    backend_options: dict[str, Any] = field(default_factory=dict)
    precision: str = DEFAULT_PRECISION
    """Precision every worker's model is loaded in; segments must ask for the same (SegmentJob.precision)."""
    workers: int | None = None
    """Number of workers; None follows the cluster's GPU count (divided by gpus_per_worker)."""
    gpus_per_worker: int = 1
    """GPUs of one worker: N > 1 makes each a group splitting every clip over N GPUs of one node."""
    parallel_cfg: bool = True
    """In a group of an even number of GPUs, the guidance branches on its two halves (group.py says why)."""
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
    """Object store of a local Ray: only small records travel through it."""
    store: str | None = None
    """Where segment folders are mirrored (s3://... or a shared folder) for workers on other nodes;
    None: workers write into the driver's work folder directly (local Ray or a shared filesystem)."""
    scratch_dir: str | None = None
    """Workers' local folder for segments when a store is used (default: the system temp folder)."""
    env_vars: dict[str, str] = field(default_factory=dict)
    """Environment for the workers (e.g. storage credentials or endpoints), through Ray's runtime_env."""


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


def init_ray(
    address: str | None = None, *, cpus: int | None = None, gpus: int | None = None, object_store_mb: int = 200
) -> None:
    """Connect to the Ray cluster at `address`, or start a local one on loopback with `cpus` and
    `gpus` (declared GPUs let a CPU machine run the pool; None detects real ones)."""
    # Ray would report usage statistics to its servers by default; a batch tool should not.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        try:
            ray.init(address=address, **quiet)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError or its own types
            raise PoolError(
                f"cannot reach the Ray cluster at {address} (set by S2V_RAY_ADDRESS or RAY_ADDRESS): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        return
    # Bound Ray's own log files on a local cluster (defaults: 512 MB x 5 per process).
    os.environ.setdefault("RAY_ROTATION_MAX_BYTES", str(16 * 1024 * 1024))
    os.environ.setdefault("RAY_ROTATION_BACKUP_COUNT", "1")
    # A local cluster talks over loopback only, not over the machine's network address.
    ray.init(num_cpus=cpus, num_gpus=gpus, object_store_memory=object_store_mb * 1024**2,
             _node_ip_address="127.0.0.1", **quiet)
