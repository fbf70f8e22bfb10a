"""The offline aligner's audio: 16 kHz s16 PCM over a noise floor, in memory or spooled to a file."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from tasks.speech.samples import Samples

NOISE_FLOOR_DB = 45.0
"""Audio is decoded over a noise floor this far under its speech level (white noise; about -60 dBFS for
speech normalized to -16 LUFS). The acoustic model learned silence from recordings whose floor sits
some 40-50 dB under the voice; TTS writes exact digital silence, and speech joined by silence far
below that floor made the forced search derail: the silence model swallowed whole words and the
path ran out of audio (slow speech, long pauses and 320 words a minute failed outright with a floor
at -80 dBFS; bench/align_accuracy.py, docs/benchmarks.md). Only the decoders hear the added floor;
the energy detector (tasks/speech/activity.py) reads the audio as it is."""



def with_floor(audio: np.ndarray, speech_db: float, noise: np.random.Generator | None = None) -> np.ndarray:
    """``audio`` over white noise NOISE_FLOOR_DB under ``speech_db`` (dBFS), the same noise on every call.
    ``noise``: the generator to draw from, for audio floored block by block (drawn in order, its blocks
    get the noise the whole would)."""
    sigma = 10 ** ((speech_db - NOISE_FLOOR_DB) / 20)
    noise = np.random.default_rng(0) if noise is None else noise
    return audio + noise.normal(0.0, sigma, len(audio)).astype(np.float32)


def to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class PcmFile:
    """16-bit PCM kept in a file and read a stretch at a time: slicing gives the bytes that slicing the
    whole PCM as bytes would (the decoders take a chunk of at most a couple of minutes at once)."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._size = file.seek(0, os.SEEK_END)

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, part: slice) -> bytes:
        start, stop, _ = part.indices(self._size)
        self._file.seek(start)
        return self._file.read(max(0, stop - start))


Pcm16 = bytes | PcmFile
"""The decoders' audio: 16 kHz s16 PCM, whole or in a file."""
SPOOL_BYTES = 2 * 2**20
"""Floored PCM up to this size (about a minute) stays in memory; beyond, it goes to a temporary file."""


@contextlib.contextmanager
def floored_pcm(samples: Samples, speech_db: float) -> Iterator[PcmFile]:
    """The decoders' input: the audio over its noise floor (``with_floor``) as 16-bit PCM, written block
    by block into a temporary file, so a long recording's PCM is not held in memory.

    Audio read from a file spools beside it (a row's work folder: the disk the batch checks and
    reports on, never a /tmp that may be full or in RAM); the file has no name and is gone when
    closed. Samples given as an array are in memory already, and so is their PCM (half their size)."""
    noise = np.random.default_rng(0)
    folder = samples.source.parent if isinstance(samples.source, Path) else None
    with io.BytesIO() if folder is None else tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, dir=folder) as file:
        for block in samples.blocks():
            file.write(to_pcm16(with_floor(np.asarray(block, dtype=np.float32), speech_db, noise)))
        yield PcmFile(file)
