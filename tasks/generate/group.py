"""What a pool slot holds, seen from the driver: one GPU worker, or a group of N splitting each clip over N GPUs.

The pool (tasks/generate/pool.py) sees either through one small interface, `Worker`: `start()`
loads the model (None when ready, else a note saying why not), `run()` streams one segment's
records (`ClipDone`..., then `SegmentDone` or `SegmentError`; `WorkerLost` when a process died),
`kill()` frees its GPUs.

- `SingleWorker`: one `GeneratorWorker` actor on one GPU, as the pool has always run
  (gpus_per_worker = 1).
- `WorkerGroup` (gpus_per_worker = N > 1): a Ray placement group of N bundles of one GPU,
  STRICT_PACK so all on one node (the collectives run every block: NVLink, not the network), and
  one `GroupRank` actor per bundle (tasks/generate/group_rank.py: how the ranks load, join one
  process group and run a segment in lockstep, rank 0 alone streaming records). This module
  starts them, joins them, follows every rank through a segment and decides what a failure costs.

Failures: a rank that dies, or that fails while the others may be stuck in a collective (which
would wait for it for ever, on NCCL), loses the whole group: the driver kills every rank, removes
the placement group and reports `WorkerLost`, so the pool replaces the group and queues the
segment again, to resume at its first missing clip; when rank 0 had already finished the segment,
the segment is kept and the group only marked `broken`, for the pool to replace before its next
segment. An out-of-memory error on any rank does the same (a fresh group as configured: the
pool's offload_on_oom rebuild is for single workers). An error every rank returned from (a
vanished input, a refused job, rank 0 failing between clips) leaves the group healthy and is the
attempt's `SegmentError`, retried as on a single worker.

Why CFG parallel by default: in the released sampler every step is guided, and the two branches
on two halves of the group exchange one velocity a step, against four all-to-alls a block for
sequence parallel; presets that guide few steps (balanced, fast) leave one half repeating the
other's conditional pass on unguided steps, where `parallel_cfg=False` (every GPU sequence
parallel) is the better choice. Figures on real GPUs are still to be measured (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tasks.generate.group_rank import GroupRank, uses_cfg_parallel
from tasks.generate.worker import ClipDone, GeneratorWorker, SegmentDone, SegmentError, WorkerInfo, describe
from tasks.records import SegmentJob

if TYPE_CHECKING:
    from tasks.generate.pool_config import PoolConfig

Record = ClipDone | SegmentDone | SegmentError

FINISH_GRACE_S = 60.0
"""How long the other ranks may take to return once rank 0 is done with a segment, or rank 0 once
another rank failed, before the group counts as stuck (they finish together when healthy)."""
JOIN_TIMEOUT_S = 120.0
"""How long the loaded ranks may take to join one process group (loading has start_timeout_s)."""


class WorkerLost(Exception):
    """The worker's process, or one rank of a group, died or was stopped; the message says which and why."""


class Worker(Protocol):
    """What a pool slot holds (see the module docstring)."""

    info: WorkerInfo | None
    broken: str | None
    """Why the worker, though its last segment finished, must be replaced before the next one."""

    async def start(self) -> str | None: ...

    def run(self, job: SegmentJob, seg_dir: str, store: str | None, scratch: str | None) -> AsyncIterator[Record]: ...

    def kill(self) -> None: ...


def make_worker(name: str, offload: bool, config: PoolConfig) -> Worker:
    """The slot's worker: a group when the pool's workers take several GPUs."""
    if config.gpus_per_worker > 1:
        return WorkerGroup(name, offload, config)
    return SingleWorker(name, offload, config)


def sequence_ranks(gpus: int, parallel_cfg: bool) -> int:
    """Ranks each forward is split over: half the group with CFG parallel (an even group), else all."""
    return gpus // 2 if uses_cfg_parallel(gpus, parallel_cfg) else gpus


def check_layout(config: PoolConfig, node_gpus: dict[str, int]) -> None:
    """ValueError unless workers of `config.gpus_per_worker` GPUs fit the cluster (`node_gpus`: GPUs
    of each node) and the model: a group lives on one node, and its forwards split the model's heads."""
    n = config.gpus_per_worker
    for node, gpus in node_gpus.items():
        if gpus % n:
            fits = [k for k in range(1, gpus + 1) if gpus % k == 0]
            raise ValueError(
                f"{n} GPUs per worker do not divide the {gpus} GPUs of node {node}: a worker's GPUs are on one "
                f"node, so each node's GPUs must split into whole workers; use one of {fits}"
            )
    heads = _num_heads(config)
    if heads is not None:
        from model.parallel import check_heads

        check_heads(heads, sequence_ranks(n, config.parallel_cfg))


def _num_heads(config: PoolConfig) -> int | None:
    """The wan-s2v checkpoint's attention heads without loading it (the 14B's 40 for a remote one);
    None for other backends, which check their own when they load."""
    if config.backend != "wan-s2v":
        return None
    from model.config import S2VConfig
    from tasks import storage

    if not config.checkpoint or storage.is_remote(config.checkpoint):
        return S2VConfig().num_heads
    from model.checkpoint import transformer_config
    from model.layout import resolve

    try:
        return transformer_config(resolve(config.checkpoint).dit).num_heads
    except Exception:  # a broken checkpoint: the workers report it when they load it
        return None


def _actor_options(config: PoolConfig) -> dict[str, Any]:
    return {
        "num_gpus": 1,
        "num_cpus": config.cpus_per_worker,
        "max_restarts": 0,
        "runtime_env": {"env_vars": dict(config.env_vars)} if config.env_vars else None,
    }


def _load_args(config: PoolConfig, offload: bool) -> tuple:
    """GeneratorWorker's constructor arguments after its name."""
    return (config.backend, config.checkpoint, config.device, offload, dict(config.backend_options), config.precision)


class SingleWorker:
    """One GeneratorWorker actor on one GPU."""

    def __init__(self, name: str, offload: bool, config: PoolConfig) -> None:
        self.name, self.offload, self.config = name, offload, config
        self.actor: Any = None
        self.info: WorkerInfo | None = None
        self.broken: str | None = None  # a single worker's failures are the segment's

    async def start(self) -> str | None:
        """Start the actor and wait for its model: None when it is ready, else why not."""
        self.actor = (
            _remote(GeneratorWorker)
            .options(**_actor_options(self.config))
            .remote(self.name, *_load_args(self.config, self.offload))
        )
        try:
            info: WorkerInfo = await asyncio.wait_for(self.actor.info.remote(), self.config.start_timeout_s)
        except (TimeoutError, GetTimeoutError):
            return f"{self.name}: no free GPU in time"
        except RayActorError as exc:
            return f"{self.name}: {str(exc).splitlines()[0]}"
        if info.error is not None:
            return f"{self.name} on node {info.node}: {info.error}"
        self.info = info
        return None

    async def run(self, job: SegmentJob, seg_dir: str, store: str | None, scratch: str | None) -> AsyncIterator[Record]:
        try:
            stream = self.actor.run.options(num_returns="streaming").remote(job, seg_dir, store, scratch)
            async for ref in stream:
                yield await ref
        except RayActorError as exc:
            raise WorkerLost(str(exc).splitlines()[0]) from None

    def kill(self) -> None:
        if self.actor is not None:
            ray.kill(self.actor, no_restart=True)


class WorkerGroup:
    """N GroupRank actors on N GPUs of one node, one segment at a time (see the module docstring)."""

    def __init__(self, name: str, offload: bool, config: PoolConfig) -> None:
        self.name, self.offload, self.config = name, offload, config
        self.ranks: list[Any] = []
        self.info: WorkerInfo | None = None
        self._group: Any = None  # the placement group
        self._failure: str | None = None  # why the current segment's group was killed
        self._segment = 0  # segments run so far: a late timer of an earlier one does nothing
        self._done = True  # the current segment is settled on every rank
        self._stream: Any = None  # rank 0's stream, kept while rank 0 finishes its segment
        self.broken: str | None = None

    async def start(self) -> str | None:
        """Reserve N GPUs on one node, load the model on each rank and join them: None when ready,
        else why not (any failure: the pool then kills what was started)."""
        try:
            return await self._start()
        except Exception as exc:  # e.g. the store's port taken, an actor that cannot be scheduled
            return f"{self.name}: {describe(exc)}"

    async def _start(self) -> str | None:
        cfg, n = self.config, self.config.gpus_per_worker
        self._group = placement_group([{"GPU": 1, "CPU": cfg.cpus_per_worker}] * n, strategy="STRICT_PACK")
        try:
            async with asyncio.timeout(cfg.start_timeout_s):
                await self._group.ready()
                options = _actor_options(cfg)
                self.ranks = [
                    _remote(GroupRank)
                    .options(scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, bundle), **options)
                    .remote(
                        self.name, *_load_args(cfg, self.offload), rank=bundle, world=n, parallel_cfg=cfg.parallel_cfg
                    )
                    for bundle in range(n)
                ]
                infos: list[WorkerInfo] = await asyncio.gather(*(rank.info.remote() for rank in self.ranks))
        except (TimeoutError, GetTimeoutError):
            return f"{self.name}: no {n} free GPUs on one node in time"
        except RayError as exc:
            return f"{self.name}: {str(exc).splitlines()[0]}"
        if errors := [f"rank {r} on node {i.node}: {i.error}" for r, i in enumerate(infos) if i.error]:
            return f"{self.name}: {'; '.join(errors)}"
        if error := await self._join(infos[0].node):
            return f"{self.name} on node {infos[0].node}: {error}"
        self.info = dataclasses.replace(
            infos[0], gpus=[g for i in infos for g in i.gpus], pids=tuple(i.pid for i in infos),
            load_s=max(i.load_s for i in infos), ready_at=max(i.ready_at for i in infos),
        )  # fmt: skip
        return None

    async def _join(self, node: str) -> str | None:
        """Join the loaded ranks into one process group: None, or the first rank's error as soon as
        it comes (the others would wait for that rank until their own timeout)."""
        joins: dict[asyncio.Future, int] = {}
        pending: set[asyncio.Future] = set()
        try:
            async with asyncio.timeout(JOIN_TIMEOUT_S):
                port = await self.ranks[0].listen.remote()
                joins = {asyncio.ensure_future(rank.join.remote(node, port)): r for r, rank in enumerate(self.ranks)}
                pending = set(joins)
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for future in done:
                        try:
                            error = future.result()
                        except RayError as exc:
                            error = str(exc).splitlines()[0]
                        if error is not None:
                            return f"rank {joins[future]}: {error}"
        except TimeoutError:
            late = min((joins[f] for f in pending), default=0)  # rank 0's store, when nothing was pending
            return f"rank {late} did not join the group within {JOIN_TIMEOUT_S:.0f}s"
        finally:
            for future in pending:
                future.cancel()
        return None

    async def run(self, job: SegmentJob, seg_dir: str, store: str | None, scratch: str | None) -> AsyncIterator[Record]:
        """Rank 0's records; WorkerLost (the group killed) when any rank died, ran out of memory or
        failed while others may wait for it."""
        self._failure, self._done = None, False
        self._segment += 1
        segment = self._segment
        followers = {r: asyncio.ensure_future(self._follow(r, segment)) for r in range(1, len(self.ranks))}
        outcome: SegmentDone | SegmentError | None = None
        try:
            try:
                self._stream = self.ranks[0].run.options(num_returns="streaming").remote(job, seg_dir, store, scratch)
                async for ref in self._stream:
                    record = await ref
                    if isinstance(record, ClipDone):
                        yield record
                    else:
                        outcome = record
                        break  # rank 0 still tells the others the segment ended
            except RayError as exc:
                self._lose(self._failure or f"rank 0 was lost: {str(exc).splitlines()[0]}")
            if outcome is None:
                self._lose(self._failure or "rank 0 ended the segment without a result")
            done, stuck = await asyncio.wait(followers.values(), timeout=FINISH_GRACE_S)
            late = min((r for r, f in followers.items() if f in stuck), default=None)
            errors = [(0, outcome)] if isinstance(outcome, SegmentError) else []
            errors += [(r, f.result()) for r, f in followers.items() if f in done and f.result() is not None]
            if isinstance(outcome, SegmentDone):  # every clip is written: a rank failing now costs the group only
                failed = f"rank {errors[0][0]} failed: {errors[0][1].error}" if errors else ""
                if reason := self._failure or _late(late) or failed:
                    self.broken = reason
                    self.kill()
                self._done = True
                yield outcome
                return
            rank0 = f"rank 0 failed: {outcome.error}; "
            if self._failure:  # a rank died, or failed while rank 0 went on
                self._lose(rank0 + self._failure)
            if late is not None:
                self._lose(rank0 + _late(late))
            if oom := [(r, e) for r, e in errors if e.kind == "oom"]:
                self._lose(f"rank {oom[0][0]} ran out of memory: {oom[0][1].error}")
        finally:  # the group lost, or the caller gone: nothing waits on the ranks any more
            for follower in followers.values():
                follower.cancel()
        self._done = True
        yield errors[0][1]

    async def _follow(self, r: int, segment: int) -> SegmentError | None:
        """Rank r's side of the segment: its error as soon as it has one (it then waits for rank 0's
        end of the segment), None when it finished cleanly. Its death kills the group at once (rank
        0 would wait for it in a collective); its error kills it unless rank 0 ends in time."""
        error: SegmentError | None = None
        try:
            async for ref in self.ranks[r].follow.options(num_returns="streaming").remote():
                error = await ref  # one at most
                reason = f"rank {r} failed: {error.error}"
                asyncio.get_running_loop().call_later(FINISH_GRACE_S, self._kill_if_running, reason, segment)
        except RayError as exc:
            if segment == self._segment and self._failure is None:
                self._failure = f"rank {r} was lost: {str(exc).splitlines()[0]}"
                self.kill()
        return error

    def _kill_if_running(self, reason: str, segment: int) -> None:
        if self._failure is None and segment == self._segment and not self._done:
            self._failure = reason
            self.kill()

    def _lose(self, reason: str) -> None:
        self._failure = reason
        self.kill()
        raise WorkerLost(reason)

    def kill(self) -> None:
        """Stop every rank and give the GPUs back."""
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        if self._group is not None:
            remove_placement_group(self._group)
            self._group = None


def _late(rank: int | None) -> str:
    return f"rank {rank} did not finish the segment within {FINISH_GRACE_S:.0f}s of rank 0" if rank is not None else ""


_remote_classes: dict[type, Any] = {}


def _remote(cls: type) -> Any:
    # One remote class per process: Ray exports a class definition each time one is made.
    if cls not in _remote_classes:
        _remote_classes[cls] = ray.remote(cls)
    return _remote_classes[cls]
