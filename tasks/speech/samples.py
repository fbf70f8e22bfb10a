"""A row's mono audio read a block at a time, from an array in memory or a sound file on disk.

The speech and planning stages read the audio through here and take what they need block by block
(sums, levels per step, energies per frame), so what they hold does not grow with the audio's
length. A long file is never read whole; an array given by a caller is only viewed, never copied whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from tasks.records import MODEL_SAMPLE_RATE

AudioInput = np.ndarray | str | os.PathLike
"""Mono samples in [-1, 1] (any float dtype), or the path of a mono sound file (read as float32)."""

BLOCK = 256_000
"""Samples per block: 16 s at 16 kHz, 1 MB of float32; a whole number of the aligner's 10 ms frames
and of the activity detector's 5 ms steps."""


@dataclass(frozen=True)
class Samples:
    """Mono audio and its length, read block by block (``blocks``)."""

    source: np.ndarray | Path
    sample_rate: int
    num_samples: int

    @classmethod
    def of(cls, audio: AudioInput | Samples, sample_rate: int = MODEL_SAMPLE_RATE) -> Samples:
        """``audio`` as Samples: an array at ``sample_rate`` (flattened), or a file at its own rate.
        ValueError for a file of more than one channel."""
        if isinstance(audio, Samples):
            return audio
        if isinstance(audio, np.ndarray):
            return cls(audio.reshape(-1) if audio.ndim != 1 else audio, sample_rate, audio.size)
        path = Path(audio)
        info = sf.info(str(path))
        if info.channels != 1:
            raise ValueError(f"{path.name}: mono audio expected, the file has {info.channels} channels")
        return cls(path, info.samplerate, info.frames)

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate

    def blocks(self, size: int = BLOCK) -> Iterator[np.ndarray]:
        """The samples in consecutive blocks of ``size`` (the last one shorter): views of an array as it
        is, float32 from a file."""
        if isinstance(self.source, np.ndarray):
            for start in range(0, self.num_samples, size):
                yield self.source[start : start + size]
            return
        yield from sf.blocks(str(self.source), blocksize=size, dtype="float32")

    def window(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start`` to ``stop`` (float32), read from a file without the rest of it."""
        if isinstance(self.source, np.ndarray):
            return np.asarray(self.source[start:stop], dtype=np.float32)
        return sf.read(str(self.source), start=start, stop=stop, dtype="float32")[0]

    def whole(self) -> np.ndarray:
        """All the samples at once (float32): for Whisper, which takes the whole recording; the others
        read ``blocks`` or ``window``s."""
        return self.window(0, self.num_samples)


def mono_16k(audio: AudioInput | Samples, sample_rate: int, caller: str) -> Samples:
    """``audio`` as Samples when it is mono at 16 kHz; ValueError naming ``caller`` otherwise."""
    if isinstance(audio, np.ndarray):
        if audio.ndim != 1:
            raise ValueError(f"{caller} takes mono audio (1-D), got shape {audio.shape}")
        audio = np.asarray(audio, dtype=np.float32)  # what the stages compute on (no copy when it is)
    samples = Samples.of(audio, sample_rate)
    if samples.sample_rate != MODEL_SAMPLE_RATE:
        raise ValueError(f"{caller} takes {MODEL_SAMPLE_RATE} Hz audio, got {samples.sample_rate} Hz")
    return samples


def sum_of_squares(samples: Samples) -> float:
    """The sum of the squared samples (float64), block by block."""
    return sum(float(np.sum(np.square(b, dtype=np.float64))) for b in samples.blocks())
