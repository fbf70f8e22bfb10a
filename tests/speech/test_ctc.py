"""The CTC aligner: its Viterbi core on hand-built emissions, and the whole path on a tiny random Wav2Vec2ForCTC.

A random model knows no speech, so the timings it gives cannot be checked for accuracy;
the tests check the contract (one timing per script word, in order, inside the audio,
scores in [0, 1], numerals spelled out) and that the loading code is the real one.
The algorithm's correctness is asserted exactly on synthetic emissions.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from spoken import SR, phrases, row_inputs

from model.tiny import write_ctc_folder
from tasks.records import RowFailure
from tasks.speech import align_row, resolve_alignment_model
from tasks.speech.ctc import ENGLISH_FOLDER, CtcAligner, char_spans, ctc_viterbi, load_ctc_model
from tasks.speech.samples import Samples
from tasks.speech.script import spoken_words

LOW, HIGH = np.log(0.02), np.log(0.96)


def speech(said: list[str], seed: int) -> np.ndarray:
    """Each phrase said alone by espeak-ng, joined with 50-300 ms pauses over a light noise floor."""
    return phrases(said, seed)[0]


def emissions(frames: int, peaks: dict[int, int], classes: int = 3, blank: int = 0) -> np.ndarray:
    """Log-probs where frame t is confidently `peaks[t]` and otherwise blank."""
    out = np.full((frames, classes), LOW)
    for t in range(frames):
        out[t, peaks.get(t, blank)] = HIGH
    return out


def test_viterbi_follows_the_peaks() -> None:
    lp = emissions(10, {2: 1, 3: 1, 6: 2})
    assert ctc_viterbi(lp, [1, 2], blank=0).tolist() == [-1, -1, 0, 0, -1, -1, 1, -1, -1, -1]


def test_repeated_characters_need_a_blank_between() -> None:
    lp = emissions(7, {2: 1, 4: 1})
    assert ctc_viterbi(lp, [1, 1], blank=0).tolist() == [-1, -1, 0, -1, 1, -1, -1]
    assert ctc_viterbi(lp[:2], [1, 1], blank=0) is None  # "aa" needs 3 frames
    assert ctc_viterbi(lp[:3], [1, 1], blank=0).tolist() == [0, -1, 1]


def test_every_target_gets_a_frame_even_without_evidence() -> None:
    lp = emissions(6, {1: 1})  # the audio only says the first character
    path = ctc_viterbi(lp, [1, 2], blank=0)
    spans = char_spans(path, lp, [1, 2])
    assert spans[0].start == 1 and spans[0].score == pytest.approx(0.96)
    assert spans[1].end - spans[1].start == 1 and spans[1].score == pytest.approx(0.02)


def brute_force_best(lp: np.ndarray, targets: list[int], blank: int) -> float:
    """Max score over every frame labelling that collapses (merge repeats, drop blanks) to the targets."""
    best = -np.inf
    for labels in itertools.product(range(lp.shape[1]), repeat=lp.shape[0]):
        collapsed = [k for k, _ in itertools.groupby(labels) if k != blank]
        if collapsed == targets:
            best = max(best, float(sum(lp[t, k] for t, k in enumerate(labels))))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_viterbi_matches_exhaustive_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lp = np.log(rng.dirichlet(np.ones(3), size=7))
    targets = [[1, 2, 1], [2, 2], [1, 1, 2], [1], [2, 1, 2], [1, 2]][seed]
    path = ctc_viterbi(lp, targets, blank=0)
    labels = [0 if k < 0 else targets[k] for k in path]
    assert [k for k, _ in itertools.groupby(path.tolist()) if k >= 0] == list(range(len(targets)))
    assert sum(lp[t, k] for t, k in enumerate(labels)) == pytest.approx(brute_force_best(lp, targets, 0))
    # A band as wide as the trellis is the unbanded search.
    assert ctc_viterbi(lp, targets, blank=0, band=2 * len(targets) + 1).tolist() == path.tolist()


def test_banded_search_on_a_long_sequence() -> None:
    rng = np.random.default_rng(1)
    targets = rng.integers(1, 5, 300).tolist()
    peaks = {}
    t = 5
    for k in targets:  # characters at an even rate, one peak every 4-6 frames
        peaks[t] = k
        t += int(rng.integers(4, 7))
    lp = emissions(t + 5, peaks, classes=5)
    full = ctc_viterbi(lp, targets, blank=0)
    assert full is not None
    assert ctc_viterbi(lp, targets, blank=0, band=80).tolist() == full.tolist()
    assert [int(np.flatnonzero(full == k)[0]) for k in range(len(targets))] == sorted(peaks)


# --------------------------------------------------------------------------- a tiny real model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Wav2Vec2ForCTC with a lowercase character vocabulary (no digits), saved like a released one."""
    # no apostrophe in the vocabulary: the aligner treats it as a wildcard
    return write_ctc_folder(tmp_path_factory.mktemp("ctc") / "tiny-ctc-en", 32, 2, "abcdefghijklmnopqrstuvwxyz", 0)


@pytest.fixture(scope="module")
def aligner(tiny_folder: Path) -> CtcAligner:
    return load_ctc_model(tiny_folder)


PHRASES = ["the", "course", "costs", "$20", "and", "it's", "3.5%", "cheaper"]


def test_contract_on_espeak_speech(aligner: CtcAligner) -> None:
    audio = speech(PHRASES, seed=3)
    analysis = aligner.align(audio, " ".join(PHRASES) + " —")
    duration = len(audio) / SR
    assert [w.word for w in analysis.words] == [*PHRASES, "—"]
    assert analysis.aligner == "ctc:tiny-ctc-en"
    starts = [w.start for w in analysis.words]
    assert starts == sorted(starts)
    for prev, w in itertools.pairwise(analysis.words):
        assert 0 <= w.start <= w.end <= duration and prev.end <= w.start
    spoken = analysis.words[:-1]
    assert all(0.0 <= w.score <= 1.0 for w in spoken)
    # A word is either timed or not found for a stated reason: a low score over quiet audio (a
    # random model may put words anywhere; it never drops one that lies over speech).
    assert all(w.end > w.start if w.found else (w.start == w.end and "quiet" in w.note) for w in spoken)
    assert analysis.words[-1].score is None and analysis.words[-1].start == analysis.words[-2].end
    # "$20" and "3.5%" were aligned as the words said (their characters are the spoken words'), and
    # are timed (edges snapped to the audio's pauses, so their length is the audio's, not the characters').
    twenty, percent = analysis.words[3], analysis.words[6]
    assert twenty.found and percent.found and twenty.end > twenty.start and percent.end > percent.start
    targets, owner = aligner._targets(spoken_words("$20 3.5%"))
    chars = {v: k for k, v in aligner.vocab.items()}
    said = {i: "".join(chars[t] for t, o in zip(targets, owner, strict=True) if o == i) for i in (0, 1)}
    assert said == {0: "twentydollars", 1: "threepointfivepercent"}
    # Random weights: the fit is near 1/vocabulary, so the aligner must say the audio does not fit.
    assert analysis.fit_score < 0.25 and analysis.approximate
    assert any(f.startswith("audio_script_mismatch") for f in analysis.flags)


def test_long_audio_in_windows_and_band(aligner: CtcAligner) -> None:
    audio = speech(PHRASES * 3, seed=4)
    audio = np.tile(audio, 5)  # ~75 s: three emission windows, a banded search
    script = " ".join(PHRASES * 15)
    log_probs = aligner.emissions(audio)
    assert len(log_probs) == (len(audio) - 400) // 320 + 1
    analysis = aligner.align(audio, script)
    assert len(analysis.words) == len(script.split())
    assert all(a.end <= b.start for a, b in itertools.pairwise(analysis.words))
    assert analysis.words[-1].end <= len(audio) / SR


def test_a_file_is_read_a_window_at_a_time_as_its_samples_would_be(aligner: CtcAligner, tmp_path: Path) -> None:
    audio = np.tile(speech(PHRASES * 3, seed=4), 5)  # ~75 s: three emission windows
    path = tmp_path / "audio_16k.wav"
    sf.write(str(path), audio, SR, subtype="PCM_16")
    samples, _ = sf.read(str(path), dtype="float32")
    assert np.array_equal(aligner.emissions(Samples.of(path)), aligner.emissions(samples))
    script = " ".join(PHRASES * 15)
    assert aligner.align(path, script) == aligner.align(samples, script)


def test_bad_input(aligner: CtcAligner) -> None:
    empty = aligner.align(np.zeros(SR, np.float32), " ... ")
    assert empty.words == [] and empty.approximate and empty.flags[0].startswith("empty_script")
    with pytest.raises(RowFailure) as silent:
        aligner.align(np.zeros(SR, np.float32), "hello there")
    assert silent.value.field == "audio"
    audio = speech(["hello", "world"], seed=7)
    foreign = aligner.align(audio, "привет мир")  # the tiny vocabulary is Latin only
    assert foreign.approximate and [w.word for w in foreign.words] == ["привет", "мир"]
    assert any(f.startswith("script_outside_vocabulary: 100%") for f in foreign.flags)
    with pytest.raises(RowFailure) as short:  # 0.2 s cannot hold 60 characters
        aligner.align(np.random.default_rng(0).normal(0, 0.1, SR // 5).astype(np.float32), "word " * 12)
    assert short.value.field == "script"


def test_numerals_and_other_scripts_are_spelled_for_the_model() -> None:
    assert spoken_words("Dr. Smith paid $20 for 3.5% café") == [
        ("Dr.", ["doctor"]),
        ("Smith", ["smith"]),
        ("paid", ["paid"]),
        ("$20", ["twenty", "dollars"]),
        ("for", ["for"]),
        ("3.5%", ["three", "point", "five", "percent"]),
        ("café", ["café"]),
    ]
    assert spoken_words("привет, мир!") == [("привет,", ["привет"]), ("мир!", ["мир"])]


def test_missing_files_are_named(tiny_folder: Path, tmp_path: Path) -> None:
    for missing in ("vocab.json", "preprocessor_config.json", "config.json", "model.safetensors"):
        broken = tmp_path / missing
        broken.mkdir()
        for f in tiny_folder.iterdir():
            if f.name != missing:
                (broken / f.name).symlink_to(f)
        with pytest.raises(ValueError, match=missing.replace(".", r"\.")) as err:
            load_ctc_model(broken)
        assert "Wav2Vec2ForCTC folder" in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_ctc_model(tmp_path / "nowhere")


def test_selection(tiny_folder: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "Wan2.2-S2V-14B"
    (checkpoint / ENGLISH_FOLDER).mkdir(parents=True)
    assert resolve_alignment_model(str(tiny_folder), str(checkpoint), "es") == str(tiny_folder)
    assert resolve_alignment_model(None, str(checkpoint), None) == str(checkpoint / ENGLISH_FOLDER)
    assert resolve_alignment_model(None, str(checkpoint), "de") is None
    assert resolve_alignment_model(None, str(tmp_path), "en") is None
    assert resolve_alignment_model(None, None, "en") is None
    audio = speech(["hello", "world"], seed=5)
    assert align_row(audio, "hello world", model_folder=str(tiny_folder)).aligner == "ctc:tiny-ctc-en"
    assert align_row(audio, "hello world", model_folder=None).aligner == "pocketsphinx-en-us"


def test_setting_from_the_environment(tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.settings import load_settings

    assert load_settings().alignment_model is None
    monkeypatch.setenv("S2V_ALIGNMENT_MODEL", str(tiny_folder))
    assert load_settings().alignment_model == str(tiny_folder)


def test_speech_step_picks_the_checkpoint_english_model(tiny_folder: Path, tmp_path: Path) -> None:
    from flows.settings import BatchSettings
    from flows.steps import speech_step

    checkpoint = tmp_path / "Wan2.2-S2V-14B"
    checkpoint.mkdir()
    (checkpoint / ENGLISH_FOLDER).symlink_to(tiny_folder)
    audio = speech(["hello", "world"], seed=6)
    row, assets = row_inputs(tmp_path, audio, "hello world", language=None)
    with_model = speech_step(row, assets, BatchSettings(checkpoint=str(checkpoint)))
    assert with_model.aligner == f"ctc:{ENGLISH_FOLDER}" and len(with_model.words) == 2
    # The cache remembers which aligner made it: without a model the offline aligner runs again.
    assert speech_step(row, assets, BatchSettings()).aligner == "pocketsphinx-en-us"
