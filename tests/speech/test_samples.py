"""Speech analysis and planning read a row's audio a block at a time (#16 item 8): the same figures as
from the whole recording, and memory that does not grow with its length."""

from __future__ import annotations

import json
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from spoken import SR

from tasks.plan import frame_energy
from tasks.speech import alignment_to_json
from tasks.speech.activity import HOP_S, WINDOW_S, analyse
from tasks.speech.offline import align_words
from tasks.speech.pcm import floored_pcm, to_pcm16, with_floor
from tasks.speech.samples import BLOCK, Samples
from tasks.speech.search import _quietness
from tasks.speech.sphinx import BYTES_PER_FRAME
from tasks.speech.verdict import rms_dbfs


def bursts(seconds: float, seed: int) -> np.ndarray:
    """Noise bursts of 0.2-0.6 s between 0.1-0.4 s pauses over a faint floor: speech-like levels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1e-3, int(seconds * SR)).astype(np.float32)
    pos = 0
    while pos < len(x):
        n = int(rng.uniform(0.2, 0.6) * SR)
        x[pos : pos + n] += rng.normal(0, 0.1, len(x[pos : pos + n])).astype(np.float32)
        pos += n + int(rng.uniform(0.1, 0.4) * SR)
    return x


def write_long(path: Path, minutes: float) -> Path:
    """A 16 kHz PCM_16 file of ``minutes`` of bursts, written a minute at a time (never whole in memory)."""
    with sf.SoundFile(str(path), "w", SR, 1, "PCM_16") as f:
        for m in range(int(minutes)):
            f.write(bursts(60.0, seed=m))
    return path


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """40 s (three blocks) as a file, and the float32 samples that file reads back as."""
    path = tmp_path_factory.mktemp("blocks") / "audio_16k.wav"
    sf.write(str(path), bursts(40.0, seed=1), SR, subtype="PCM_16")
    assert sf.info(str(path)).frames > 2 * BLOCK
    return path, sf.read(str(path), dtype="float32")[0]


def whole_levels(x: np.ndarray) -> np.ndarray:
    """The levels as computed before streaming: one cumulative sum over the whole recording."""
    hop, window = round(HOP_S * SR), round(WINDOW_S * SR)
    sq = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    centre = np.arange(-(-len(x) // hop)) * hop + hop // 2
    a, b = np.clip(centre - window // 2, 0, len(x)), np.clip(centre + window // 2, 0, len(x))
    return np.maximum(10 * np.log10((sq[b] - sq[a]) / np.maximum(b - a, 1) + 1e-30), -90.0)


def test_block_by_block_figures_equal_the_whole_recordings(recording: tuple[Path, np.ndarray]) -> None:
    path, x = recording
    from_file, from_array = analyse(path), analyse(x)
    assert np.array_equal(from_file.level_db, whole_levels(x))
    for field in ("level_db", "floor_db", "quiet"):
        assert np.array_equal(getattr(from_file, field), getattr(from_array, field)), field
    assert from_file.speech_db == from_array.speech_db
    assert rms_dbfs(path) == pytest.approx(10 * np.log10(np.mean(np.square(x, dtype=np.float64))), abs=1e-9)

    # The decoders' PCM: the same bytes, noise floor included, as flooring the whole array at once.
    whole = to_pcm16(with_floor(x, from_file.speech_db))
    num_frames = len(x) // 160
    with floored_pcm(Samples.of(path), from_file.speech_db) as pcm:
        assert len(pcm) == len(whole) and pcm[:] == whole
        a, b = 1234 * BYTES_PER_FRAME, 3210 * BYTES_PER_FRAME  # a stretch across a block's edge
        assert pcm[a:b] == whole[a:b]
        assert np.array_equal(_quietness(pcm, num_frames), _quietness(whole, num_frames))
    frames = np.frombuffer(whole, dtype="<i2").astype(np.float32)[: num_frames * 160].reshape(num_frames, 160)
    expected = np.convolve((frames**2).mean(axis=1), np.ones(20) / 20, mode="same")
    assert np.array_equal(_quietness(whole, num_frames), expected)

    n = -(-len(x) // 160)
    padded = np.zeros(n * 160, np.float32)
    padded[: len(x)] = x
    energy = (padded.reshape(n, 160) ** 2).sum(axis=1) / np.array([160] * (n - 1) + [len(x) - (n - 1) * 160])
    assert np.array_equal(frame_energy(path), energy.astype(np.float32))


def test_the_aligner_reads_a_file_as_it_would_its_samples(tmp_path: Path) -> None:
    from spoken import phrases

    audio, _ = phrases(["welcome to the course", "on customer service"], seed=2, speed=170, tail_s=0.3)
    path = tmp_path / "audio_16k.wav"
    sf.write(str(path), audio, SR, subtype="PCM_16")
    script = "welcome to the course on customer service"
    from_file = alignment_to_json(align_words(path, script))
    from_array = alignment_to_json(align_words(sf.read(str(path), dtype="float32")[0], script))
    assert json.dumps(from_file) == json.dumps(from_array)
    assert all(w["found"] for w in from_file["words"])


def test_a_long_files_pcm_spools_in_its_folder(tmp_path: Path) -> None:
    """Beside the row's audio (the work disk the batch watches), not in the system's temporary folder."""
    row = tmp_path / "row"
    row.mkdir()
    path = write_long(row / "audio_16k.wav", 2)  # 3.8 MB of PCM: more than the spool keeps in memory
    with floored_pcm(Samples.of(path), -30.0) as pcm:
        assert len(pcm) == 2 * 60 * SR * 2  # 16-bit samples
        spool = os.readlink(f"/proc/self/fd/{pcm._file.fileno()}")  # "<folder>/#<inode> (deleted)": no name
        assert Path(spool).parent == row
    assert [p.name for p in row.iterdir()] == ["audio_16k.wav"]


def traced_peak(work: Callable[[], object]) -> int:
    """Bytes of the largest Python and numpy allocation total while ``work`` runs."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_of_the_audio_passes_does_not_grow_with_the_audio(tmp_path: Path) -> None:
    short, long = write_long(tmp_path / "one.wav", 1), write_long(tmp_path / "twelve.wav", 12)

    def passes(path: Path) -> Callable[[], object]:
        def run() -> None:
            samples = Samples.of(path)
            rms_dbfs(samples)
            act = analyse(samples)
            frame_energy(samples)
            with floored_pcm(samples, act.speech_db) as pcm:
                _quietness(pcm, samples.num_samples // 160)

        return run

    whole_long = 12 * 60 * SR * 4  # the twelve minutes as float32: 46 MB
    peak_short, peak_long = traced_peak(passes(short)), traced_peak(passes(long))
    # What grows is a few per-step figures (levels, quiet mask: ~0.2 MB a minute), not the samples:
    # 9.9 MB for 1 minute, 10.9 MB for 12 when measured.
    assert peak_long < 1.25 * peak_short
    assert peak_long < whole_long / 3


@pytest.mark.parametrize("length", [1, 79, 80, 161, BLOCK - 41, BLOCK, BLOCK + 39, 2 * BLOCK + 123])
def test_levels_of_any_length_equal_the_whole_recordings(length: int) -> None:
    x = bursts(length / SR + 1, seed=length)[:length]
    assert np.array_equal(analyse(x).level_db, whole_levels(x))
