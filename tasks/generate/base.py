"""The generator interface: what the generation stage calls, whatever the backend.

A backend renders one planned segment clip by clip. It yields each clip as soon as it
is done, together with the lossless state needed to continue after it, so the stage
(and later the GPU pool) can persist every clip and resume a segment at its first
missing clip. Backends know nothing about files, retries or storage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from tasks.records import SegmentJob


@dataclass
class GeneratedClip:
    """One finished clip from a backend."""

    index: int
    frames: np.ndarray
    """uint8 array (T, H, W, 3), RGB, at the job's size and fps."""
    state: dict[str, np.ndarray] = field(default_factory=dict)
    """Lossless continuation state (e.g. float32 motion frames); empty when none is needed."""
    gpu_s: float = 0.0
    """Accelerator seconds spent on this clip (0 on CPU backends)."""
    forwards: int = 0
    """DiT passes run for this clip, in batch rows (0 for backends without a DiT)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Where the clip's time went, for backends that know (see ClipResult.timings)."""


@runtime_checkable
class Generator(Protocol):
    """A backend that turns a SegmentJob into clips."""

    name: str
    """Short backend name recorded in logs and the report (e.g. 'preview', 'wan-s2v')."""

    def clips(
        self,
        job: SegmentJob,
        start_clip: int = 0,
        state: dict[str, np.ndarray] | None = None,
    ) -> Iterator[GeneratedClip]:
        """Yield clips `start_clip .. job.segment.clips - 1` in order.

        `state` is the state yielded with clip `start_clip - 1` (None when starting at 0).
        Resuming from it must produce the same clips as an uninterrupted run.
        """
        ...
