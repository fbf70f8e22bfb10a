"""The `paced` generator: a fixed cost per clip and model-like state, for benchmarks and fault tests.

It stands in for a GPU model where the pool's behaviour is what is being measured: each
clip costs exactly `clip_s` seconds (a sleep, so fake GPUs need no real cores), its
frames depend on the continuation state carried from the previous clip (as the model's
depend on its float motion frames), and the state is float32, so a resume that lost or
rounded the state would produce different clips. Faults can be injected per row id:
an error raised at every attempt, or a CUDA-style out-of-memory error raised while the
generator is not offloaded; a device can be declared broken, so the generator fails to
load on it. Optionally it appends one line per computed clip to a log
file, so tests can tell which clips were computed and by which process.

Test doubles for the pool's tests and bench/pool_bench.py, with the jobs they render. The pool's
workers load the generator by the import path `PACED`: Ray puts the driver's working folder
(the repository root, where the tests and the bench run) on the workers' module path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from tasks.generate.base import GeneratedClip
from tasks.records import Segment, SegmentJob

PACED = "tests.paced:PacedGenerator"
STATE_SIZE = 16
WIDTH, HEIGHT, INFER_FRAMES = 112, 64, 4


class OutOfMemoryError(RuntimeError):
    """Named like torch's CUDA OOM error, which the pool recognizes by name and message."""


class PacedGenerator:
    """Fixed cost per clip; frames are a deterministic function of (seed, clip, carried state)."""

    name = "paced"

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        device: str | None = None,
        offload: bool = False,
        clip_s: float = 0.1,
        fail_rows: Sequence[str] = (),
        oom_rows: Sequence[str] = (),
        log: str | None = None,
        broken_devices: Sequence[str] = (),
    ):
        # A GPU that cannot hold the model, as the worker on it sees it (Ray sets CUDA_VISIBLE_DEVICES).
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if visible and visible in set(broken_devices):
            raise RuntimeError(f"CUDA error: no usable device {visible} (injected)")
        self.offload = offload
        self.clip_s = clip_s
        self.fail_rows = set(fail_rows)
        self.oom_rows = set(oom_rows)
        self.log = log
        self.fingerprint = f"paced-v1:{clip_s}"

    def clips(
        self, job: SegmentJob, start_clip: int = 0, state: dict[str, np.ndarray] | None = None
    ) -> Iterator[GeneratedClip]:
        motion = np.zeros(STATE_SIZE, np.float32)
        if start_clip > 0:
            if not state or "motion" not in state:
                raise ValueError(f"resuming at clip {start_clip} needs the state of clip {start_clip - 1}")
            motion = np.asarray(state["motion"], np.float32)
        for k in range(start_clip, job.segment.clips):
            if job.row_id in self.fail_rows:
                raise RuntimeError(f"injected failure in row {job.row_id} segment {job.segment.index} clip {k}")
            if job.row_id in self.oom_rows and not self.offload:
                raise OutOfMemoryError("CUDA out of memory (injected; retry with offloading)")
            t0 = time.monotonic()
            rng = np.random.default_rng([job.segment.seed, k])
            motion = np.tanh(1.7 * motion + rng.standard_normal(STATE_SIZE).astype(np.float32)).astype(np.float32)
            frames = _frames(job, k, motion)
            time.sleep(max(0.0, self.clip_s - (time.monotonic() - t0)))
            if self.log:
                # One short O_APPEND write per line: lines from concurrent workers do not interleave.
                with open(self.log, "a") as f:
                    f.write(f"{job.row_id}\t{job.segment.index}\t{k}\t{os.getpid()}\n")
            yield GeneratedClip(index=k, frames=frames, state={"motion": motion.copy()}, gpu_s=self.clip_s)


def _frames(job: SegmentJob, clip: int, motion: np.ndarray) -> np.ndarray:
    """Smooth colour fields driven by the state: cheap to draw and to encode."""
    t = np.arange(job.infer_frames, dtype=np.float32)[:, None, None]
    y = np.linspace(0, 1, job.height, dtype=np.float32)[None, :, None]
    x = np.linspace(0, 1, job.width, dtype=np.float32)[None, None, :]
    channels = []
    for c in range(3):
        a, b, p = motion[3 * c], motion[3 * c + 1], motion[3 * c + 2]
        wave = np.sin(6.0 * (a * x + b * y) + 0.2 * (t + clip * job.infer_frames) + 3.0 * p)
        channels.append(127.5 + 100.0 * wave)
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """A portrait (a colour gradient) and one second of speech (a 220 Hz tone) for paced jobs."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    Image.fromarray(np.stack([xx * 2, yy * 3, (xx + yy) % 255], -1).astype(np.uint8)).save(folder / "face.png")
    tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)
    sf.write(folder / "speech.wav", (tone * 32767).astype(np.int16), 16000, subtype="PCM_16")
    return folder / "face.png", folder / "speech.wav"


def paced_job(inputs: tuple[Path, Path], row: str, index: int, clips: int, seed: int = 42, trim: int = 1) -> SegmentJob:
    """A small segment job for the paced generator: one second of 16 kHz audio, `clips` clips of
    INFER_FRAMES frames at WIDTH x HEIGHT, the last trimmed by `trim` frames (as a planned segment's
    usually is); the segment's seed follows from `seed` and `index`."""
    segment = Segment(
        index=index, start_sample=0, end_sample=16000, start_s=0.0, end_s=1.0,
        frames=clips * INFER_FRAMES - trim, clips=clips, seed=seed * 1000 + index,
    )
    return SegmentJob(
        row_id=row, segment=segment, image=str(inputs[0]), audio=str(inputs[1]), prompt="",
        width=WIDTH, height=HEIGHT, infer_frames=INFER_FRAMES,
    )


def tiny_s2v_job(folder: Path) -> tuple[str, SegmentJob]:
    """The tiny Wan2.2-S2V checkpoint (model.tiny, random weights) written under `folder`, and a
    one-segment job of 3 clips of 4 frames at 64x64 for it (a 160 Hz tone as speech): the
    real architecture on CPU in seconds, for the pool's kill-and-resume test and benchmark."""
    from model.tiny import write_tiny_checkpoint  # the model extra: only where this is used

    checkpoint = str(write_tiny_checkpoint(folder / "tiny", seed=0))
    Image.new("RGB", (64, 64), (90, 120, 160)).save(folder / "face.png")
    tone = 0.3 * np.sin(2 * np.pi * 160 * np.arange(16000) / 16000)
    sf.write(folder / "speech.wav", (tone * 32767).astype(np.int16), 16000, subtype="PCM_16")
    segment = Segment(index=0, start_sample=0, end_sample=16000, start_s=0, end_s=1, frames=12, clips=3, seed=5)
    job = SegmentJob(
        row_id="tiny", segment=segment, image=str(folder / "face.png"), audio=str(folder / "speech.wav"),
        prompt="a person talking", width=64, height=64, infer_frames=4, steps=2,
    )  # fmt: skip
    return checkpoint, job
