"""In-process loudness measurement (tasks/normalize/measure.py) against the ffmpeg binary's own `ebur128`
summary and decode, on real media made here."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from media import _ffmpeg, encode, header_only_wav, speech, speechlike, with_silence, write_wav

from tasks.normalize.audio import _limiter_chain, _source_chain
from tasks.normalize.measure import Chain, filter_spec, measure


def _cli(src: Path, chain: Chain) -> tuple[float, float, float]:
    """(integrated, LRA, true peak) from the ffmpeg binary's `ebur128` summary after `chain`."""
    filters = ",".join(f"{name}={filter_spec(args, kwargs)}" for name, args, kwargs in chain)
    log = _ffmpeg("-nostats", "-i", str(src), "-af", f"{filters},ebur128=peak=true:framelog=quiet", "-f", "null", "-")
    summary = log[log.rfind("Summary:") :]
    found = [re.search(pattern + r"\s+(-?[\d.]+|-inf)", summary) for pattern in (r"I:", r"LRA:", r"Peak:")]
    assert all(found), summary
    return tuple(float(m.group(1)) for m in found)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, int]]:
    """name -> (file, source rate, channels as normalization reads them)."""
    folder = tmp_path_factory.mktemp("measure")
    spoken = speech(folder / "spoken.wav", "Please review the safety checklist before you start the machine.")
    quiet = write_wav(folder / "quiet.wav", with_silence(speechlike(4.0, 16_000, level=0.02), 16_000, 0.5, 0.5), 16_000)
    stereo = write_wav(folder / "stereo.wav", speechlike(5.0, 48_000, channels=2, level=0.9, seed=3), 48_000)
    return {
        "espeak wav 22.05 kHz": (spoken, 22_050, 1),
        "mp3 44.1 kHz stereo": (encode(spoken, folder / "s.mp3", rate=44_100, channels=2), 44_100, 2),
        "m4a 48 kHz stereo": (encode(stereo, folder / "s.m4a"), 48_000, 2),
        "flac": (encode(spoken, folder / "s.flac"), 22_050, 1),
        "quiet wav 16 kHz": (quiet, 16_000, 1),
    }


def test_loudness_and_true_peak_equal_the_ffmpeg_summary(sources: dict[str, tuple[Path, int, int]]) -> None:
    for name, (src, rate, channels) in sources.items():
        chain = _source_chain(rate, channels)
        got = measure(src, chain, channels=channels)
        assert got is not None and got.threshold is None, name
        assert (got.integrated, got.lra, got.true_peak) == _cli(src, chain), name


def test_limiter_chain_with_a_cut_equals_the_ffmpeg_summary(sources: dict[str, tuple[Path, int, int]]) -> None:
    """The peak limiter's measurement: trimmed at both ends (the graph ends before the file does)."""
    for name, (src, rate, channels) in sources.items():
        trim = (rate // 4, 3 * rate)
        chain = _source_chain(rate, channels, trim) + _limiter_chain(9.0, rate, trim[1] - trim[0])
        got = measure(src, chain, channels=channels)
        assert got is not None and (got.integrated, got.lra, got.true_peak) == _cli(src, chain), name


def test_samples_are_the_ffmpeg_decode(sources: dict[str, tuple[Path, int, int]], tmp_path: Path) -> None:
    """The samples handed on are the float32 samples the ffmpeg binary decodes through the same chain."""
    for name, (src, rate, channels) in sources.items():
        chain = _source_chain(rate, channels)
        pieces: list[np.ndarray] = []
        measure(src, chain, channels=channels, on_samples=pieces.append)
        got = np.concatenate(pieces)
        raw = tmp_path / f"{rate}-{channels}.f32"
        filters = ",".join(f"{n}={filter_spec(a, k)}" for n, a, k in chain)
        _ffmpeg("-i", str(src), "-af", filters, "-f", "f32le", "-acodec", "pcm_f32le", str(raw))
        expected = np.fromfile(raw, dtype="<f4").reshape(-1, channels)
        assert got.dtype == np.float32 and got.shape[1] == channels, name
        if name.startswith("m4a"):  # AAC's end padding: the binary drops it, the library hands it on
            assert 0 <= len(got) - len(expected) <= 1024, name
            got = got[: len(expected)]
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_a_file_without_samples_measures_nothing(tmp_path: Path) -> None:
    src = header_only_wav(tmp_path / "empty.wav")
    pieces: list[np.ndarray] = []
    assert measure(src, _source_chain(16_000, 1), channels=1, on_samples=pieces.append) is None
    assert pieces == []
