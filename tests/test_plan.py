"""Property-based and example tests of the chunk planner (tasks/plan.py)."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from rich.console import Console

from flows.views import plan_summary_table
from tasks.cost import CostModel, plans_to_json
from tasks.plan import frame_energy, plan_row, segment_seed
from tasks.records import Plan, Resolution, SpeechAnalysis, WordTiming

SR = 16_000


def synthetic_words(
    rng: np.random.Generator, num_samples: int, *, max_word_s: float, pause_p: float, overlap: bool
) -> list[WordTiming]:
    """Words of random length separated by random pauses (some zero-length) up to the end of the audio."""
    dur = num_samples / SR
    n = max(1, int(dur / 0.2) + 2)
    lengths = rng.uniform(0.05, max_word_s, n)
    gaps = np.where(rng.random(n) < pause_p, rng.exponential(0.4, n), 0.0)
    if overlap:  # aligners sometimes emit overlapping words; the planner must cope
        gaps = np.where(rng.random(n) < 0.1, -rng.uniform(0, 0.05, n), gaps)
    lead = rng.uniform(0, min(2.0, dur / 2))
    starts = lead + np.concatenate([[0.0], np.cumsum(lengths + gaps)[:-1]])
    ends = starts + lengths
    keep = ends <= dur
    # model_construct: these timings are valid by construction, and hours of words must build fast.
    return [
        WordTiming.model_construct(word=f"w{i}", start=float(s), end=float(e), score=None)
        for i, (s, e) in enumerate(zip(starts[keep], ends[keep], strict=True))
    ]


@st.composite
def rows(draw: st.DrawFn, *, long_words: bool = False) -> tuple[float, int, float, float, float, bool]:
    """Parameters of a synthetic row (the words are built from them, keeping failure reports short)."""
    # Durations from 0.5 s to 3 h, biased towards the interesting region around a few maxima.
    seconds = draw(
        st.one_of(
            st.floats(0.5, 400.0), st.floats(0.5, 400.0), st.floats(400.0, 3 * 3600.0), st.sampled_from([0.5, 10800.0])
        )
    )
    max_s = draw(st.sampled_from([20.0, 30.0, 60.0, 90.0]))
    # Normal speech: the window between min and max is wider than any word, so both bounds can hold.
    mins = [0.0, max_s / 2] if long_words else [m for m in (0.0, 2.0, 5.0, 10.0) if m <= max_s / 2 - 2]
    min_s = draw(st.sampled_from(mins))
    return seconds, draw(st.integers(0, 2**32 - 1)), max_s, min_s, draw(st.floats(0.0, 1.0)), draw(st.booleans())


def build(
    case: tuple[float, int, float, float, float, bool], *, long_words: bool = False
) -> tuple[int, list[WordTiming], float, float]:
    seconds, seed, max_s, min_s, pause_p, overlap = case
    num_samples = max(1, round(seconds * SR))
    words = synthetic_words(
        np.random.default_rng(seed),
        num_samples,
        max_word_s=40.0 if long_words else 1.2,
        pause_p=pause_p,
        overlap=overlap,
    )
    return num_samples, words, max_s, min_s


def check_invariants(plan: Plan, num_samples: int, words: list[WordTiming] | None, infer_frames: int = 80) -> None:
    segs = plan.segments
    assert segs[0].start_sample == 0 and segs[-1].end_sample == num_samples
    for a, b in zip(segs, segs[1:], strict=False):
        assert a.end_sample == b.start_sample  # no gap, no overlap
    for i, s in enumerate(segs):
        assert s.index == i
        assert s.end_sample > s.start_sample
        assert s.start_s == s.start_sample / SR and s.end_s == s.end_sample / SR
        assert s.frames == math.ceil(Fraction(s.end_sample - s.start_sample, SR) * 16)
        assert s.clips == math.ceil(Fraction(s.frames, infer_frames))
        assert s.est_gpu_s is not None and s.est_gpu_s > 0
    if words:
        cuts = np.array([s.start_sample for s in segs[1:]], dtype=np.int64)
        w_start = np.array([round(w.start * SR) for w in words], dtype=np.int64)
        w_end = np.array([round(w.end * SR) for w in words], dtype=np.int64)
        inside = (cuts[:, None] > w_start[None, :]) & (cuts[:, None] < w_end[None, :])
        assert not inside.any(), "a cut falls inside a word"
        # ... and in seconds too, as a caller would check it (to the nearest sample).
        t = cuts[:, None] / SR
        starts = np.array([w.start for w in words])[None, :] + 0.5 / SR
        ends = np.array([w.end for w in words])[None, :] - 0.5 / SR
        assert not ((t > starts) & (t < ends)).any()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows())
def test_properties_normal_speech(case: tuple[float, int, float, float, float, bool]) -> None:
    num_samples, words, max_s, min_s = build(case)
    plan = plan_row("r", num_samples, words, seed=7, width=832, height=480, max_segment_s=max_s, min_segment_s=min_s)
    check_invariants(plan, num_samples, words)
    assert not plan.approximate
    lengths = [(s.end_sample - s.start_sample) / SR for s in plan.segments]
    # Words shorter than the window always leave a valid cut, so the maximum holds ...
    assert all(n <= max_s + 1e-9 for n in lengths)
    # ... and no segment is shorter than the minimum unless the audio is.
    if len(lengths) > 1:
        assert all(n >= min_s - 1e-9 for n in lengths)
    # Deterministic for the same input.
    again = plan_row("r", num_samples, words, seed=7, width=832, height=480, max_segment_s=max_s, min_segment_s=min_s)
    assert again == plan


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows(long_words=True))
def test_properties_words_longer_than_the_window(case: tuple[float, int, float, float, float, bool]) -> None:
    # Pathological timings (40 s "words", overlaps): never cut a word, even if a segment runs long.
    num_samples, words, max_s, min_s = build(case, long_words=True)
    plan = plan_row("r", num_samples, words, seed=1, width=832, height=480, max_segment_s=max_s, min_segment_s=min_s)
    check_invariants(plan, num_samples, words)
    if len(plan.segments) > 1:
        assert all((s.end_sample - s.start_sample) / SR >= min_s - 1e-9 for s in plan.segments)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.5, 3 * 3600.0), st.integers(-(2**31), 2**31 - 1))
def test_properties_without_words(seconds: float, seed: int) -> None:
    num_samples = round(seconds * SR)
    plan = plan_row("r", num_samples, None, seed=seed, width=832, height=480)
    check_invariants(plan, num_samples, None)
    assert plan.approximate
    lengths = [(s.end_sample - s.start_sample) / SR for s in plan.segments]
    assert all(n <= 60.0 for n in lengths)
    assert len(lengths) == math.ceil(num_samples / (60 * SR))  # balanced split, no extra segments
    assert plan.segments[0].seed == seed


def test_cut_prefers_the_long_pause_near_the_target() -> None:
    # 100 s of speech: 0.4 s words every 0.5 s, plus 0.7 s extra pause before the words at 20 s and 45 s,
    # so two 0.8 s pauses: (20.4, 21.2) and (45.6, 46.4).
    words = []
    for k in range(196):
        start = k * 0.5 + 0.7 * (k * 0.5 >= 20) + 0.7 * (k * 0.5 >= 45)
        words.append(WordTiming(word="x", start=round(start, 3), end=round(start + 0.4, 3)))
    plan = plan_row("r", 100 * SR, words, seed=3, width=832, height=480)
    assert len(plan.segments) == 2
    # The 0.8 s pause 4 s before the 50 s target beats the 0.1 s gaps at the target and the far pause.
    assert plan.segments[1].start_s == pytest.approx(46.0)


def test_no_alignment_cuts_at_the_quietest_point_near_the_target() -> None:
    # 90 s of noise with 0.5 s of silence at 41 s: the cut (target 45 s) goes into the silence.
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.1, 90 * SR).astype(np.float32)
    audio[41 * SR : int(41.5 * SR)] = 0.0
    plan = plan_row("r", len(audio), None, seed=3, width=832, height=480, energy=frame_energy(audio))
    assert plan.approximate and len(plan.segments) == 2
    assert 41.0 <= plan.segments[1].start_s <= 41.5
    flat = plan_row("r", len(audio), None, seed=3, width=832, height=480)
    assert flat.segments[1].start_sample == 45 * SR  # without an envelope: the balanced target


def test_one_word_spanning_the_window_moves_the_cut_after_it() -> None:
    words = [
        WordTiming(word="a", start=0.0, end=5.0),
        WordTiming(word="long", start=5.0, end=75.0),
        WordTiming(word="b", start=75.5, end=90.0),
    ]
    plan = plan_row("r", 100 * SR, words, seed=3, width=832, height=480)
    assert [s.start_sample for s in plan.segments] == [0, 75 * SR]


def test_short_audio_is_one_segment_and_cost_follows_the_model() -> None:
    plan = plan_row("r", SR // 2, [WordTiming(word="hi", start=0.1, end=0.4)], seed=5, width=832, height=480)
    (seg,) = plan.segments
    assert (seg.frames, seg.clips, seg.seed) == (8, 1, 5)
    first, later, overhead = 2.975, 3.27, 7.0  # the H100 figures in tasks/cost.py (docs/benchmarks.md)
    assert seg.est_gpu_s == pytest.approx(40 * 2 * first + overhead)
    # 3 clips: one first clip, two later ones, 2 CFG passes per step, plus each clip's overhead.
    assert CostModel().estimate(3, resolution=Resolution.P480, steps=40) == pytest.approx(
        40 * 2 * (first + 2 * later) + 3 * overhead
    )
    assert CostModel(gpu="L4").estimate(3, resolution="480p", steps=40) is None


def test_segment_seeds_are_stable_and_distinct() -> None:
    # Fixed values: a change here changes every user's seeded output.
    assert [segment_seed(42, i) for i in range(3)] == [42, segment_seed(42, 1), segment_seed(42, 2)]
    assert segment_seed(42, 1) == 47170719
    assert segment_seed(-5, 2) == segment_seed(-5, 2) != segment_seed(-5, 3)
    assert all(0 <= segment_seed(s, i) < 2**31 for s in (0, 42, -1, 2**40) for i in range(1, 5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"infer_frames": 78}, "multiple of 4"),
        ({"infer_frames": 0}, "multiple of 4"),
        ({"min_segment_s": 40.0}, "min_segment_s"),
        ({"max_segment_s": 0.0}, "max_segment_s"),
        ({"num_samples": 0}, "num_samples"),
        ({"width": 0}, "width"),
    ],
)
def test_invalid_parameters_are_rejected(kwargs: dict, message: str) -> None:
    args = {"num_samples": SR * 10, "seed": 1, "width": 832, "height": 480} | kwargs
    with pytest.raises(ValueError, match=message):
        plan_row("r", args.pop("num_samples"), None, **args)


def test_audio_other_than_the_planned_rate_or_length_is_rejected(tmp_path: Path) -> None:
    """The cuts are computed from num_samples at sample_rate: a file read at another rate or length would
    verify them against other audio."""
    rng = np.random.default_rng(0)
    path = tmp_path / "audio_16k.wav"
    sf.write(str(path), rng.normal(0, 0.1, 80 * SR).astype(np.float32), SR)
    args = {"seed": 1, "width": 832, "height": 480, "audio": path}
    assert len(plan_row("r", 80 * SR, None, **args).segments) == 2
    with pytest.raises(ValueError, match=f"audio_16k.wav has {80 * SR} samples at 16000 Hz; the plan is for {81 * SR}"):
        plan_row("r", 81 * SR, None, **args)
    sf.write(str(path), rng.normal(0, 0.1, 80 * 24_000).astype(np.float32), 24_000)
    with pytest.raises(ValueError, match="audio_16k.wav has 1920000 samples at 24000 Hz"):
        plan_row("r", 80 * 24_000, None, **args)
    with pytest.raises(ValueError, match=f"the audio has {80 * SR} samples"):
        plan_row("r", 79 * SR, None, **(args | {"audio": np.zeros(80 * SR, np.float32)}))


def test_json_and_table() -> None:
    words = [WordTiming(word="x", start=t, end=t + 0.3) for t in np.arange(0.2, 129.0, 0.5)]
    plans = [
        plan_row("a", 130 * SR, words, seed=1, width=832, height=480),
        plan_row("b", 5 * SR, None, seed=2, width=832, height=480),
    ]
    doc = plans_to_json(plans)
    assert json.loads(json.dumps(doc)) == doc
    assert [r["id"] for r in doc["rows"]] == ["a", "b"]
    assert len(doc["rows"][0]["segments"]) == 3
    assert set(doc["rows"][0]["segments"][0]) == {"start_s", "end_s", "frames", "clips", "seed", "est_gpu_s"}
    console = Console(record=True, width=120)
    console.print(plan_summary_table(plans))
    text = console.export_text()
    total_h = sum(s.est_gpu_s for p in plans for s in p.segments) / 3600
    assert "total (2 rows)" in text and f"{total_h:.2f}" in text and "b ~" in text


def test_cuts_fall_on_frame_boundaries_when_the_pause_allows() -> None:
    # Pauses of 300 ms around 30 s, 60 s and 90 s: every cut lands on a whole frame (1000 samples),
    # so each segment's frames cover exactly its audio and sync cannot drift across segments.
    words, t = [], 0.0
    while t < 119.0:
        gap = 0.3 if int(t) % 30 == 29 else 0.05
        words.append(WordTiming(word="w", start=t + 0.0137, end=t + 0.6137))
        t += 0.6 + gap
    plan = plan_row("r", 120 * 16000, words, seed=1, width=832, height=480, max_segment_s=35, min_segment_s=5)
    assert len(plan.segments) >= 4
    for seg in plan.segments[1:]:
        assert seg.start_sample % 1000 == 0
        assert not any(w.start * 16000 < seg.start_sample < w.end * 16000 for w in words)
    assert sum(s.frames for s in plan.segments) == 120 * 16


# --------------------------------------------------------------------------- cuts verified against the audio


def voiced_speech(
    rng: np.random.Generator, seconds: float, *, pause_every_s: float | None, floor: float
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Synthetic speech with known word boundaries: voiced "words" of 0.15-0.7 s (a pulse train with
    harmonics and a syllable envelope, some with a stop closure of up to 80 ms inside) joined by gaps of
    0-120 ms, with a pause of 0.4-1.2 s every ``pause_every_s`` (none when None), over noise ``floor``.
    Returns the audio and each word's true [start, end) in samples."""
    n = int(seconds * SR)
    audio = rng.normal(0, floor, n)
    words, pos, since = [], int(rng.uniform(0.2, 0.6) * SR), 0.0
    while True:
        length = int(rng.uniform(0.15, 0.7) * SR)
        if pos + length >= n:
            break
        t = np.arange(length) / SR
        f0 = rng.uniform(90, 250)
        voice = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6)) / h for h in range(1, 8))
        env = 0.25 + 0.75 * np.abs(np.sin(np.pi * t * rng.uniform(2, 6)))
        word = 0.2 * voice * env
        if length > 0.3 * SR and rng.random() < 0.5:  # a stop closure: near-silence inside the word
            c = int(rng.uniform(0.3, 0.6) * length)
            word[c : c + int(rng.uniform(0.02, 0.08) * SR)] *= 0.001
        audio[pos : pos + length] += word
        words.append((pos, pos + length))
        since += length / SR
        gap = rng.uniform(0.0, 0.12)
        if pause_every_s is not None and since >= pause_every_s:
            gap, since = rng.uniform(0.4, 1.2), 0.0
        pos += length + int(gap * SR)
    return audio.astype(np.float32), words


def aligned(rng: np.random.Generator, words: list[tuple[int, int]], error_s: float) -> list[WordTiming]:
    """What an aligner might say: each edge off by up to ``error_s``, some words merged or not found."""
    out = []
    for i, (a, b) in enumerate(words):
        s = max(0.0, a / SR + rng.uniform(-error_s, error_s))
        e = max(s, b / SR + rng.uniform(-error_s, error_s))
        if rng.random() < 0.05:  # not found: zero length at the previous word's end
            out.append(WordTiming(word=f"w{i}", start=out[-1].end if out else 0.0, end=out[-1].end if out else 0.0,
                                  score=0.0, found=False))  # fmt: skip
            continue
        out.append(WordTiming(word=f"w{i}", start=round(s, 3), end=round(e, 3)))
    return out


def cuts_inside(plan: Plan, words: list[tuple[int, int]]) -> list[int]:
    return [s.start_sample for s in plan.segments[1:] if any(a < s.start_sample < b for a, b in words)]


@st.composite
def speech_rows(draw: st.DrawFn, *, pauses: bool) -> tuple[int, float, float, float, float]:
    seconds = draw(st.floats(30.0, 240.0))
    max_s = draw(st.sampled_from([15.0, 20.0, 30.0, 60.0]))
    min_s = draw(st.sampled_from([m for m in (0.0, 2.0, 5.0) if m <= max_s / 2 - 2]))
    error = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))  # from a good alignment to a wrong one
    return draw(st.integers(0, 2**32 - 1)), seconds, max_s, min_s, error


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(speech_rows(pauses=True), st.sampled_from([0.0, 3e-4, 0.005]))
def test_properties_cuts_in_the_audio_pauses_even_with_a_wrong_alignment(case: tuple, floor: float) -> None:
    seed, seconds, max_s, min_s, error = case
    rng = np.random.default_rng(seed)
    # A pause at least every max_s / 2 seconds: every window holds a safe cut.
    audio, truth = voiced_speech(rng, seconds, pause_every_s=max_s / 2 - 1.5, floor=floor)
    words = aligned(rng, truth, error)
    plan = plan_row("r", len(audio), words, seed=1, width=832, height=480, max_segment_s=max_s,
                    min_segment_s=min_s, audio=audio)  # fmt: skip
    check_invariants(plan, len(audio), None)  # exact cover, frames and clips
    unsafe = [f for f in plan.flags if f.startswith("unsafe_cut")]
    inside = cuts_inside(plan, truth)
    # A cut is never inside a true word unless the row says so; with a fair alignment it never is.
    assert len(inside) <= len(unsafe)
    if error <= 0.05:
        assert not inside and not unsafe, plan.flags
    for seg in plan.segments[1:]:
        assert seg.start_sample % (SR // 16) == 0  # on a video-frame boundary
    assert all((s.end_sample - s.start_sample) / SR <= max_s + 1e-9 for s in plan.segments)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(speech_rows(pauses=False))
@example((527, 45.0, 15.0, 0.0, 0.0))  # a word not found whose stop closure is the quietest point
def test_properties_without_a_pause_the_row_says_so(case: tuple) -> None:
    seed, seconds, max_s, min_s, error = case
    rng = np.random.default_rng(seed)
    audio, truth = voiced_speech(rng, seconds, pause_every_s=None, floor=3e-4)
    words = aligned(rng, truth, 0.0)
    min_s = max(min_s, 2.0)  # the lead and tail silences (under 0.7 s) are quiet: keep cuts off them
    plan = plan_row("r", len(audio), words, seed=1, width=832, height=480, max_segment_s=max_s,
                    min_segment_s=min_s, audio=audio)  # fmt: skip
    check_invariants(plan, len(audio), None)
    unsafe = [f for f in plan.flags if f.startswith("unsafe_cut")]
    # No gap reaches MIN_QUIET_S, so no cut is safe: each one is flagged with its window, and the
    # least harmful point is between aligned words (the alignment here is exact for the words it
    # found; a word it did not find can hide a stop closure the quietest point falls into, flagged).
    assert len(unsafe) == len(plan.segments) - 1
    assert all(re.search(r"in \d+\.\d-\d+\.\d s; cut at \d+\.\d\d s, between", f) for f in unsafe), unsafe
    assert not cuts_inside(plan, [true for true, word in zip(truth, words, strict=True) if word.found])


def test_plan_carries_the_alignments_evidence() -> None:
    rng = np.random.default_rng(5)
    audio, truth = voiced_speech(rng, 100.0, pause_every_s=None, floor=3e-4)
    words = aligned(rng, truth, 0.0)
    speech = SpeechAnalysis(aligner="test", approximate=False, words=words, fit_score=0.42,
                            flags=["words_not_spoken: 1 of 9 script words not found in the audio: 'x'"])  # fmt: skip
    plan = plan_row("r", len(audio), words, seed=1, width=832, height=480, audio=audio, speech=speech)
    assert plan.fit_score == 0.42 and plan.flags[0].startswith("words_not_spoken")
    assert any(f.startswith("unsafe_cut") for f in plan.flags)
    doc = plans_to_json([plan])["rows"][0]
    assert doc["fit_score"] == 0.42 and doc["flags"] == plan.flags


def test_cost_follows_the_preset_the_gpu_kind_and_the_price() -> None:
    from model.presets import preset
    from tasks.cost import GPU_KINDS, cost_model, gpu_kind, plans_to_json

    first, later, overhead = 2.975, 3.27, 7.0
    exact = cost_model("H100")
    fast = cost_model("H100", speed=preset("fast"), preset="fast", price_per_gpu_hour=3.0)
    # fast: 14 steps (under the row's 40), guidance on the first 3: 3 x 2 + 11 passes a clip at most
    assert fast.forwards_per_clip(40) == 17 and exact.forwards_per_clip(40) == 80
    assert fast.forwards_per_clip(10) == 13  # a row asking for fewer steps keeps them (3 x 2 + 7)
    assert fast.forwards_per_clip(40, guidance=1.0) == 14  # no guidance: one pass a step
    assert fast.estimate(2, resolution="480p", steps=40) == pytest.approx(17 * (first + later) + 2 * overhead)
    assert fast.money(3600) == 3.0 and exact.money(3600) is None
    # other GPUs scale the H100's figures by their relative speed (vendor ratios, marked as such)
    a100 = cost_model("a100")
    assert a100.gpu == "A100" and not GPU_KINDS["A100"].measured and GPU_KINDS["H100"].measured
    assert a100.estimate(1, resolution="480p", steps=40) == pytest.approx(
        (80 * first + overhead) / GPU_KINDS["A100"].relative_speed, rel=1e-3
    )
    assert gpu_kind("rtx-4090").name == "RTX 4090" and gpu_kind("L4") is None
    with pytest.raises(ValueError, match="GPU kind 'L4'"):
        cost_model("L4")
    # a calibration on the user's weights replaces the nominal count with the passes the preset ran
    calibration = {"presets": {"fast": {"speed": preset("fast").to_dict(), "forwards_per_clip": 12.5}}}
    assert cost_model(speed=preset("fast"), preset="fast", calibration=calibration).forwards_per_clip(40) == 12.5

    plan = plan_row("r", 10 * SR, None, seed=1, width=832, height=480, cost=fast)
    doc = plans_to_json([plan], price_per_gpu_hour=3.0)
    (seg,) = plan.segments
    assert doc["rows"][0]["est_gpu_s"] == seg.est_gpu_s == doc["est_gpu_s"]
    assert doc["est_cost"] == pytest.approx(seg.est_gpu_s / 3600 * 3.0, abs=1e-4)
    assert plans_to_json([plan])["est_cost"] is None
