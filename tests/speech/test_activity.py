"""The energy detector the aligner and planner trust (tasks/speech/activity.py), on audio made here."""

from __future__ import annotations

import numpy as np
from spoken import SR, phrases

from tasks.speech.activity import MIN_QUIET_S, analyse, snap_to_pauses


def bursts(spans: list[tuple[float, float]], seconds: float, floor: float, seed: int = 0) -> np.ndarray:
    """Voiced bursts (a 150 Hz pulse train with harmonics) at ``spans`` over noise of RMS ``floor``."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    audio = rng.normal(0, floor, len(t))
    for a, b in spans:
        sl = slice(int(a * SR), int(b * SR))
        audio[sl] += sum(0.3 / h * np.sin(2 * np.pi * 150 * h * t[sl]) for h in range(1, 6))
    return audio.astype(np.float32)


def test_quiet_runs_are_the_pauses_whatever_the_floor() -> None:
    spans = [(0.5, 1.2), (1.6, 2.0), (2.05, 2.6), (3.5, 4.0)]  # pauses of 0.4 s, 0.05 s and 0.9 s
    for floor in (0.0, 1e-4, 0.01):  # digital silence, a quiet room, noise 25 dB under the voice
        act = analyse(bursts(spans, 4.5, floor))
        lo, hi = act.quiet_runs()
        runs = list(zip(lo / SR, hi / SR, strict=True))
        # The 0.4 s and 0.9 s pauses (and the lead and tail) are quiet runs; the 0.05 s gap is too short.
        assert len(runs) == 4, runs
        for (a, b), (pa, pb) in zip(runs[1:3], [(1.2, 1.6), (2.6, 3.5)], strict=True):
            assert abs(a - pa) < 0.02 and abs(b - pb) < 0.02
        assert all(b - a >= MIN_QUIET_S for a, b in runs)
        assert act.quiet_share(0.6, 1.1) == 0.0 and act.quiet_share(2.7, 3.4) == 1.0


def test_edges_snap_onto_the_pauses_and_never_overlap() -> None:
    audio, truth = phrases(["welcome", "to", "the", "course"], seed=2)
    act = analyse(audio)
    # Aligned spans off by up to 60 ms either way, two of them overlapping.
    rough = [(s + d, e - d) for (s, e), d in zip(truth, (0.06, -0.04, 0.05, -0.06), strict=True)]
    rough[1] = (rough[1][0], truth[2][0] + 0.03)
    snapped = snap_to_pauses(rough, act)
    for (s, e), (ts, te) in zip(snapped, truth, strict=True):
        assert abs(s - ts) <= 0.015 and abs(e - te) <= 0.015
    assert all(a[1] <= b[0] for a, b in zip(snapped, snapped[1:], strict=False))


def test_touching_words_meet_where_the_next_one_starts() -> None:
    # A word's faint tail (40 dB under it) runs into the next word with no pause, as TTS joins words;
    # an acoustic model gives the tail to the next word. The boundary moves to the next word's onset.
    t = np.arange(int(2.2 * SR)) / SR
    voice = sum(0.3 / h * np.sin(2 * np.pi * 150 * h * t) for h in range(1, 6))
    audio = np.zeros_like(t)
    for a, b, gain in ((0.5, 1.0, 1.0), (1.0, 1.1, 0.01), (1.1, 1.6, 1.0)):
        sl = slice(int(a * SR), int(b * SR))
        audio[sl] = gain * voice[sl]
    act = analyse(audio.astype(np.float32))
    (s1, e1), (s2, e2) = snap_to_pauses([(0.5, 1.0), (1.0, 1.6)], act)
    assert abs(e1 - 1.1) <= 0.015 and e1 == s2
    assert abs(s1 - 0.5) <= 0.015 and abs(e2 - 1.6) <= 0.015


def test_edges_grow_over_a_bed_by_a_little_at_most() -> None:
    # Two words over a bed of noise 20 dB under the voice, and between them a loud sound that is not a
    # word (a music hit). The aligned edges are right; the quiet stretch before the hit must not pull
    # the second word's start back over the hit.
    spans = [(0.5, 1.0), (1.8, 2.3)]
    audio = bursts(spans + [(1.3, 1.5)], 3.0, floor=0.02)
    act = analyse(audio)
    assert act.speech_db - float(np.median(act.floor_db)) < 40  # a bed, not a clean floor
    snapped = snap_to_pauses(spans, act)
    for (s, e), (ts, te) in zip(snapped, spans, strict=True):
        assert abs(s - ts) <= 0.1 and abs(e - te) <= 0.1


def test_a_boundary_inside_a_word_moves_to_the_nearest_clear_pause() -> None:
    # Two words 90 ms apart over a clean floor; the first has a 40 ms stop closure near its end. An
    # aligner far from the voice put the boundary 0.2 s before the pause, inside the first word: the
    # boundary goes to the pause, not to the closure. Over a bed the same audio keeps the short reach.
    spans = [(0.5, 1.05), (1.09, 1.3), (1.39, 1.9)]  # word 1 = two bursts around its closure
    truth = [(0.5, 1.3), (1.39, 1.9)]
    rough = [(0.5, 1.1), (1.1, 1.9)]
    snapped = snap_to_pauses(rough, analyse(bursts(spans, 2.4, floor=1e-4)))
    for (s, e), (ts, te) in zip(snapped, truth, strict=True):
        assert abs(s - ts) <= 0.015 and abs(e - te) <= 0.015
    (_, e1), (s2, _) = snap_to_pauses(rough, analyse(bursts(spans, 2.4, floor=0.02)))
    assert e1 < 1.25 and s2 < 1.25  # a quiet stretch over a bed may be inside a word: not taken from afar
