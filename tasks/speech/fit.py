"""The offline aligner's fit score: how well the audio says the script, word by word.

A free phone loop decodes the audio (every phone of the bundled acoustic model may follow any
other, with no phone language model); each aligned token scores the similarity of its dictionary
phones to the phones the loop heard in its frames (1 - normalized edit distance). The mean over the
script is the fit score (``tasks/speech/verdict.py``): high when the audio says the script, low for
a wrong file, another language or music.

Why no phone language model (docs/benchmarks.md, "Offline aligner"): the bundled phonetic trigram
model made the loop hear English-like phone sequences in anything, and its look-ups, one per phone
transition per frame, were half the loop's time. Without it the loop hears the acoustics alone: on
bench/align_accuracy.py's corpus it runs in half the time, and the fits of matching and wrong
scripts lie further apart (own script ≥ 0.305, another script ≤ 0.123; with the model: 0.151 and
0.106).
"""

from __future__ import annotations

from pocketsphinx import Decoder

from tasks.speech.sphinx import BYTES_PER_FRAME, FILLERS, FRAME_RATE, decode, decoder

MISMATCH_FIT = 0.2
"""The audio does not say the script when the fit is below MISMATCH_FIT or at least
MISMATCH_SKIPPED (tasks/speech/verdict.py) of the script words carry a note (not found, placed only
by forcing, or stretched over unscripted speech). Calibrated with bench/align_accuracy.py's corpus
(docs/benchmarks.md): with their own script the intelligible conditions fit at 0.305-0.549 (TTS,
human speech, pink noise and a music bed at 10 dB SNR), none flagged; with another condition's
script at 0.032-0.123, or no alignment at all, every one flagged."""
PHONE_LOOP_OPTIONS = {"ds": 2}
"""The phone loop scores every other frame (ds 2): it only feeds the fit score; its default beams."""
FIT_FULL_S = 120.0
"""Audio up to this long gets the phone loop over all of it."""
FIT_WINDOW_S = 15.0
FIT_SHARE = 0.25
"""Longer audio gets it over evenly spaced windows of FIT_WINDOW_S covering FIT_SHARE of it
(at least FIT_FULL_S): the phone loop costs about as much as the alignment itself, and a sample
is enough to tell a wrong file or another language."""

Heard = list[tuple[str, int, int]]
"""Phones the loop heard: (phone, first frame, end frame exclusive)."""


def phone_loop_decoder() -> Decoder:
    """A decoder whose search is the free phone loop (uniform transitions between all phones)."""
    loop = decoder(**PHONE_LOOP_OPTIONS)
    loop.add_allphone_file("loop", None)  # no phone language model: the acoustics alone
    loop.activate_search("loop")
    return loop


def fit_windows(num_frames: int) -> list[tuple[int, int]]:
    """Frame ranges [a, b) the phone loop decodes."""
    if num_frames <= FIT_FULL_S * FRAME_RATE:
        return [(0, num_frames)]
    win = int(FIT_WINDOW_S * FRAME_RATE)
    count = max(int(FIT_FULL_S / FIT_WINDOW_S), round(num_frames * FIT_SHARE / win))
    stride = num_frames / count
    return [(int(i * stride), min(num_frames, int(i * stride) + win)) for i in range(count)]


def phone_loop(loop: Decoder, pcm16, num_frames: int) -> Heard:
    """Phones the free phone loop hears in 16 kHz s16 PCM (bytes, or anything sliced to bytes), over
    the fit windows."""
    heard: Heard = []
    for a, b in fit_windows(num_frames):
        decode(loop, pcm16[a * BYTES_PER_FRAME : b * BYTES_PER_FRAME])
        heard += [(s.word, s.start_frame + a, s.end_frame + a + 1) for s in loop.seg() if s.word not in FILLERS]
    return heard


def edit_similarity(a: list[str], b: list[str]) -> float:
    """1 - Levenshtein(a, b) / max(len): hand-written, a dozen lines, on phone lists of a word."""
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def token_score(
    expected: list[str], heard: Heard, sf: int, ef: int, windows: list[tuple[int, int]]
) -> tuple[list[str], float | None]:
    """The phones heard in a token's frames [sf, ef) (those at least half inside) and their similarity
    to its ``expected`` phones; no score for a token outside the decoded ``windows`` (no evidence)."""
    if not any(a <= sf and ef <= b for a, b in windows):
        return [], None
    in_word = [p for p, a, b in heard if min(b, ef) - max(a, sf) >= 0.5 * (b - a)]
    return in_word, edit_similarity(expected, in_word)
