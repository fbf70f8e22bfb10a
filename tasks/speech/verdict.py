"""What every aligner answers the same way: the audio it takes, and the verdict on the fit.

An aligner never returns silently wrong timings: every problem becomes a flag on the returned
SpeechAnalysis, with evidence, or a RowFailure when there is nothing to align.

Flags (each "code: evidence"):

* ``empty_script``: the script has no speakable words; no timings (approximate).
* ``words_not_spoken``: script words the audio does not contain, each with the reason
  (``WordTiming.note``); they get zero-length timings at the previous word's end and
  ``found=False``.
* ``low_word_fit``: stretches of consecutive words whose phones do not match what was
  heard: spoken words missing from the script, misreadings, or a partly wrong file.
* ``unscripted_speech`` (offline aligner): script words aligned over more speech than they say
  (longer than their phones last, or holding a pause): the audio says words the script lacks.
* ``audio_script_mismatch``: the fit over the whole script is below the aligner's
  ``MISMATCH_FIT`` or too many words were not found (``MISMATCH_SKIPPED``): a wrong file,
  another language, or music; with a ``worst_stretch`` flag naming the five words that fit
  worst. The timings are then unreliable and the analysis is marked ``approximate`` so
  planning does not cut by them.

RowFailure("audio", ...) when the audio holds no signal at all (silence), and
RowFailure("script", ...) when no path through the script fits the audio at all.
Callers plan with ``analysis.words`` only when ``analysis.approximate`` is false.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tasks.records import RowFailure, SpeechAnalysis, WordTiming
from tasks.speech.samples import AudioInput, Samples, mono_16k, sum_of_squares

MISMATCH_SKIPPED = 0.3
"""The audio does not say the script when at least this share of the script words were not found
(whatever the fit; calibrated with the offline aligner's MISMATCH_FIT, see tasks/speech/fit.py)."""
LOW_WORD_FIT = 0.1
"""A run of at least LOW_RUN words whose mean score is below this is flagged as a local mismatch."""
LOW_RUN = 6
SILENCE_DBFS = -60.0
"""Audio whose RMS is below this holds no speech to align."""


def as_mono_16k(audio: AudioInput, sample_rate: int, caller: str) -> np.ndarray:
    """All of ``audio`` as float32 when it is mono at 16 kHz; ValueError naming ``caller`` otherwise.
    For the aligners that take the whole recording at once (CTC, Whisper)."""
    return mono_16k(audio, sample_rate, caller).whole()


def rms_dbfs(audio: AudioInput | Samples) -> float:
    """RMS level of the audio in dBFS (summed block by block; -200 for no samples)."""
    samples = Samples.of(audio)
    if not samples.num_samples:
        return -200.0
    return float(10 * np.log10(sum_of_squares(samples) / samples.num_samples + 1e-20))


def require_sound(audio: AudioInput | Samples, sample_rate: int, script_words: int) -> None:
    """Refuse audio too short or too quiet to hold speech (RowFailure on the audio column)."""
    samples = Samples.of(audio, sample_rate)
    level = rms_dbfs(samples)
    if samples.num_samples < samples.sample_rate // 10 or level < SILENCE_DBFS:
        raise RowFailure(
            "audio",
            f"no speech to align: {samples.duration_s:.2f} s of audio at {level:.0f} dBFS RMS "
            f"for a script of {script_words} words",
        )


def empty_script(aligner: str) -> SpeechAnalysis:
    """What every aligner answers for a script with nothing to align: no timings, flagged."""
    return SpeechAnalysis(
        aligner=aligner,
        approximate=True,
        words=[],
        flags=["empty_script: the script has no words to align; cuts will be approximate"],
    )


def _quote(words: list[str], limit: int = 8) -> str:
    text = " ".join(words[:limit]) + (" …" if len(words) > limit else "")
    return f"'{text}'"


def _low_runs(words: list[WordTiming], spoken: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs of >= LOW_RUN spoken, scored words whose mean score stays below LOW_WORD_FIT.

    A run stops at a word without a score (outside the sampled fit windows) or not spoken.
    """
    scores = [w.score if (s and w.score is not None) else None for w, s in zip(words, spoken, strict=True)]
    runs = []
    i = 0
    while i < len(scores):
        if scores[i] is None or scores[i] >= LOW_WORD_FIT:
            i += 1
            continue
        j, total = i, scores[i]
        while (
            j + 1 < len(scores) and scores[j + 1] is not None and (total + scores[j + 1]) / (j + 2 - i) < LOW_WORD_FIT
        ):
            j += 1
            total += scores[j]
        if j - i + 1 >= LOW_RUN:
            runs.append((i, j))
        i = j + 1
    return runs


def low_fit_flags(words: list[WordTiming], spoken: list[bool]) -> list[str]:
    """A ``low_word_fit`` flag for each run of LOW_RUN or more spoken words that fit the audio poorly."""
    flags = []
    for i, j in _low_runs(words, spoken):
        mean = np.mean([w.score or 0.0 for w in words[i : j + 1]])
        flags.append(
            f"low_word_fit: words {i + 1}-{j + 1} {_quote([w.word for w in words[i : j + 1]])} at "
            f"{words[i].start:.1f}-{words[j].end:.1f} s match the audio poorly (score {mean:.2f})"
        )
    return flags


def _worst_stretch(words: list[WordTiming], span: int = 5) -> str:
    """Evidence of where the fit breaks: the stretch of ``span`` words with the lowest mean score."""
    scores = np.array([np.nan if w.score is None else w.score for w in words])
    span = min(span, len(words))
    means = [
        np.nanmean(scores[i : i + span]) if not np.isnan(scores[i : i + span]).all() else np.inf
        for i in range(len(words) - span + 1)
    ]
    i = int(np.argmin(means))
    j = i + span - 1
    return (
        f"worst_stretch: words {i + 1}-{j + 1} {_quote([w.word for w in words[i : j + 1]])} at "
        f"{words[i].start:.1f}-{words[j].end:.1f} s (score {means[i]:.2f})"
    )


def _missing_word(word: WordTiming) -> str:
    why = (word.note or "").removeprefix("not found: ")
    return f"'{word.word}' (near {word.start:.1f} s{': ' + why if why else ''})"


def judge_fit(
    aligner: str,
    words: list[WordTiming],
    missing: list[int],
    *,
    mismatch_fit: float,
    how_missing: str,
    extra_flags: Sequence[str] = (),
    unmatched: int | None = None,
) -> SpeechAnalysis:
    """The verdict every aligner gives the same way: fit score (mean word score), the words not
    spoken, and whether the audio says this script at all (then the timings are approximate).

    ``unmatched``: words the aligner's recognition pass could not match (placed only by forcing, or
    not found); the share of those decides a mismatch when given, else the share not found.
    The mismatch flags come last so a reader of the report sees the conclusion after its evidence.
    """
    scored = [w.score for w in words if w.score is not None]
    fit = float(np.mean(scored)) if scored else 0.0
    flags: list[str] = []
    if missing:
        shown = ", ".join(_missing_word(words[i]) for i in missing[:6])
        flags.append(
            f"words_not_spoken: {len(missing)} of {len(words)} script words {how_missing}: "
            f"{shown}{' …' if len(missing) > 6 else ''}"
        )
    flags.extend(extra_flags)
    share = (len(missing) if unmatched is None else unmatched) / len(words)
    mismatch = fit < mismatch_fit or share >= MISMATCH_SKIPPED
    if mismatch:
        flags.append(_worst_stretch(words))
        flags.append(
            f"audio_script_mismatch: fit {fit:.2f} (threshold {mismatch_fit}), {share:.0%} of "
            f"{len(words)} words not found{'' if unmatched is None else ' by recognition'} (threshold "
            f"{MISMATCH_SKIPPED:.0%}): the audio does not say this script (wrong file, another language, or no speech)"
        )
    return SpeechAnalysis(aligner=aligner, approximate=mismatch, words=words, fit_score=round(fit, 3), flags=flags)
