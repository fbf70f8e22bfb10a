"""The ranks of a worker group (tasks/generate/group.py): the Ray actor each GPU of the group runs.

Each `GroupRank` loads the generator once in its constructor; rank 0 then opens a TCP store on its
node, every rank joins one torch.distributed process group through it (nccl on CUDA, gloo on CPU)
and the generator is made parallel (`enable_parallel`, for wan-s2v model/parallel.py: sequence
parallel over the ranks, and CFG parallel when the group has an even number of ranks and
`parallel_cfg` is on).

A segment goes to every rank of one group. Rank 0 runs it as a single worker does
(tasks/generate/stage.py writes the clips and the states, resuming at the first missing clip) and
alone streams records to the driver; before each `clips` call it broadcasts the call (job, first
clip, state) over a gloo control group, and before each clip a `NEXT`; the other ranks make the
same call, step it clip by clip with rank 0 and drop the clips, so every rank computes in lockstep
from the same inputs and state, and none starts a clip rank 0 will not (rank 0 failing while it
writes or stores a clip leaves them waiting for its next message, not in a collective). A
segment's end is broadcast too. The other ranks send nothing but an error, at once; what the
driver does with it is group.py's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import ray

from tasks.generate.base import GeneratedClip
from tasks.generate.worker import (
    ClipDone,
    GeneratorWorker,
    SegmentDone,
    SegmentError,
    WorkerInfo,
    classify_error,
    describe,
    format_traceback,
)
from tasks.records import SegmentJob

NEXT = "next"
"""Rank 0's message before each clip of a segment: the other ranks compute it with rank 0."""
COLLECTIVE_TIMEOUT_S = 1800.0
"""torch.distributed's timeout for joining the group and for each collective (its default): the
driver stops a stuck group sooner (group.FINISH_GRACE_S); this only bounds a rank left waiting."""


def uses_cfg_parallel(gpus: int, parallel_cfg: bool) -> bool:
    return parallel_cfg and gpus >= 2 and gpus % 2 == 0


class GroupRank(GeneratorWorker):
    """Ray actor body of one rank: the generator loaded once (GeneratorWorker), then joined to the
    group's process group. Rank 0 serves `run` (the driver's records); the others `follow`."""

    def __init__(self, name: str, *load: Any, rank: int, world: int, parallel_cfg: bool) -> None:
        if problem := _gpu_problem(load[2]):  # before loading: every rank would load on the same GPU
            self.generator, self._info = None, _failed_info(name, load[3], problem)
        else:
            super().__init__(name, *load)
        self.rank, self.world, self.parallel_cfg = rank, world, parallel_cfg
        self.device = load[2]
        self._store: Any = None
        self._control: Any = None  # a gloo group for the small control messages, also on CUDA

    # The process group is set up by hand: Ray Train's TorchTrainer owns a training loop's workers,
    # not long-lived actors serving calls, and ray.util.collective gives no torch.distributed groups
    # for model/parallel.py's all-to-alls; a TCP store on rank 0 and init_process_group is all it takes.

    def listen(self) -> int:
        """Rank 0: open the group's TCP store on this node; its port, for the other ranks."""
        import torch.distributed as dist

        self._store = dist.TCPStore(
            self._info.node, 0, self.world, is_master=True, wait_for_workers=False, timeout=_timeout()
        )
        return self._store.port

    def join(self, address: str, port: int) -> str | None:
        """Join the process group through the store at address:port and split the generator over
        it; None, or the error."""
        import torch
        import torch.distributed as dist

        from model.parallel import parallel_groups

        try:
            if self._store is None:
                self._store = dist.TCPStore(address, port, self.world, is_master=False, timeout=_timeout())
            cuda = _on_cuda(self.device)
            if cuda:
                torch.cuda.set_device(0)  # Ray shows each rank its own GPU only
            dist.init_process_group(
                "nccl" if cuda else "gloo", store=self._store, rank=self.rank, world_size=self.world, timeout=_timeout()
            )
            self._control = dist.new_group(backend="gloo")
            enable = getattr(self.generator, "enable_parallel", None)
            if enable is None:
                raise ValueError(
                    f"backend {self.generator.name!r} cannot split a clip over several GPUs; set gpus_per_worker=1"
                )
            enable(parallel_groups(cfg=uses_cfg_parallel(self.world, self.parallel_cfg)))
            if self.rank == 0:
                self.generator = _Leader(self.generator, self._control)
        except Exception as exc:
            return describe(exc)
        return None

    def run(
        self, job: SegmentJob, seg_dir: str, store: str | None = None, scratch: str | None = None
    ) -> Iterator[ClipDone | SegmentDone | SegmentError]:
        """Rank 0: the segment as a single worker renders it, then its end told to the other ranks."""
        try:
            yield from super().run(job, seg_dir, store, scratch)
        finally:
            self.generator.end()

    def follow(self) -> Iterator[SegmentError]:
        """A rank other than 0: make rank 0's `clips` call of one segment and step it clip by clip as
        rank 0 says (dropping the clips), until rank 0 says the segment ended. Stepping in lockstep
        keeps this rank from starting a clip rank 0 will not compute (rank 0 failed while writing or
        storing the last one): it waits at the next message instead. An error is sent at once (the
        driver stops the group if rank 0 goes on waiting for this rank); the rank still waits for rank
        0's end, so the next segment's messages stay in step when rank 0 failed the same way."""
        started, failed = time.monotonic(), False
        clips: Iterator[GeneratedClip] | None = None
        while (message := _broadcast(None, self._control)) is not None:
            try:
                if message != NEXT:
                    job, start, state = message
                    clips = self.generator.clips(job, start_clip=start, state=state)
                elif clips is not None and next(clips, None) is None:
                    clips = None  # the backend stopped early, on rank 0 too: the stage reports it
            except Exception as exc:  # every failure must reach the driver
                clips = None
                if not failed:
                    busy = round(time.monotonic() - started, 4)
                    yield SegmentError(classify_error(exc), describe(exc), format_traceback(exc), busy)
                failed = True


class _Leader:
    """Rank 0's generator: broadcasts each `clips` call before making it, then `NEXT` before each
    clip (the other ranks step with it), and the segment's end."""

    def __init__(self, generator: Any, control: Any) -> None:
        self._generator, self._control = generator, control

    def __getattr__(self, name: str) -> Any:  # name, fingerprint, load_timings: the generator's
        return getattr(self._generator, name)

    def clips(self, job: SegmentJob, start_clip: int = 0, state: dict | None = None) -> Iterator[GeneratedClip]:
        _broadcast((job, start_clip, state), self._control)
        return self._stepped(self._generator.clips(job, start_clip=start_clip, state=state))

    def _stepped(self, clips: Iterator[GeneratedClip]) -> Iterator[GeneratedClip]:
        while True:
            _broadcast(NEXT, self._control)
            clip = next(clips, None)
            if clip is None:
                return
            yield clip

    def end(self) -> None:
        _broadcast(None, self._control)


def _broadcast(message: Any, group: Any) -> Any:
    """Rank 0's `message` on every rank of `group` (a small pickled object)."""
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _timeout() -> timedelta:
    return timedelta(seconds=COLLECTIVE_TIMEOUT_S)


def _gpu_problem(device: str | None) -> str | None:
    """Why a rank on CUDA cannot tell its own GPU: Ray shows each rank only the GPU of its bundle
    (CUDA_VISIBLE_DEVICES), unless RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES turns that off."""
    import torch

    if _on_cuda(device) and (count := torch.cuda.device_count()) != 1:
        return (
            f"this rank sees {count} GPUs, not the 1 Ray gave it (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES', '')!r}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): unset the first for workers of several GPUs"
        )
    return None


def _on_cuda(device: str | None) -> bool:
    import torch

    return (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")


def _failed_info(name: str, offload: bool, error: str) -> WorkerInfo:
    """A rank's info when it did not load the model."""
    return WorkerInfo(
        name=name, pid=os.getpid(), node=ray.util.get_node_ip_address(), gpus=[str(g) for g in ray.get_gpu_ids()],
        offload=offload, load_s=0.0, error=error,
    )  # fmt: skip
