"""Forced alignment of a row's script to its 16 kHz audio: one WordTiming per script word.

``align_words`` is the offline default (pocketsphinx with its bundled English model,
see ``tasks/align_offline.py`` for the method). It never returns silently wrong
timings: every problem becomes a flag on the returned SpeechAnalysis, with evidence,
or a RowFailure when there is nothing to align.

Flags (each "code: evidence"):

* ``empty_script``: the script has no speakable words; no timings (approximate).
* ``words_not_spoken``: script words the audio does not contain (they get zero-length
  timings at the previous word's end and score 0).
* ``low_word_fit``: stretches of consecutive words whose phones do not match what was
  heard: spoken words missing from the script, misreadings, or a partly wrong file.
* ``audio_script_mismatch``: the fit over the whole script is below ``MISMATCH_FIT``
  or too many words were not found: a wrong file, another language, or music; with a
  ``worst_stretch`` flag naming the five words that fit worst. The timings are then
  unreliable and the analysis is marked ``approximate`` so planning does not cut by them.

RowFailure("audio", ...) when the audio holds no signal at all (silence), and
RowFailure("script", ...) when no path through the script fits the audio at all.
Callers plan with ``analysis.words`` only when ``analysis.approximate`` is false.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tasks.align_offline import ScriptWord, TokenAlignment, align_tokens, normalize_script, to_pcm16
from tasks.records import MODEL_SAMPLE_RATE, RowFailure, SpeechAnalysis, WordTiming

ALIGNER = "pocketsphinx-en-us"
MISMATCH_FIT = 0.15
MISMATCH_SKIPPED = 0.3
"""The audio does not say the script when the fit is below MISMATCH_FIT or at least
MISMATCH_SKIPPED of the script words were not found. Calibrated with bench/align_accuracy.py
(docs/benchmarks.md): with their own script, LibriVox human speech fits at 0.39-0.46 with no word
skipped and espeak-ng speech at 0.19-0.51 with <= 17% skipped; with another recording's script or a
Spanish script, fits are 0.03-0.16 with >= 37% skipped (or no alignment at all)."""
LOW_WORD_FIT = 0.1
"""A run of at least LOW_RUN words whose mean score is below this is flagged as a local mismatch."""
LOW_RUN = 6
SILENCE_DBFS = -60.0
"""Audio whose RMS is below this holds no speech to align."""


def _rms_dbfs(audio: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(audio, dtype=np.float64)) + 1e-20))


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


def align_words(audio_16k: np.ndarray, script: str, *, sample_rate: int = MODEL_SAMPLE_RATE) -> SpeechAnalysis:
    """Align ``script`` to mono float audio at 16 kHz (values in [-1, 1]).

    Returns one WordTiming per whitespace-separated script word, in order, in seconds,
    with a score in [0, 1] (phone agreement between the script and what was heard);
    ``fit_score`` is the mean over the script. Raises ValueError for audio that is not
    16 kHz mono and RowFailure as described in the module docstring.
    """
    if sample_rate != MODEL_SAMPLE_RATE:
        raise ValueError(f"align_words takes {MODEL_SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
    audio = np.asarray(audio_16k, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"align_words takes mono audio (1-D), got shape {audio.shape}")
    duration = len(audio) / sample_rate
    script_words: list[ScriptWord] = normalize_script(script or "")
    tokens = [t for w in script_words for t in w.tokens]
    if not tokens:
        return empty_script(ALIGNER)
    require_sound(audio, sample_rate, len(script_words))
    num_frames = int(round(duration * 100))
    aligned = align_tokens(to_pcm16(audio), tokens, num_frames)
    if aligned is None:
        raise RowFailure(
            "script",
            f"the audio does not match the script: no alignment of its {len(tokens)} "
            f"spoken tokens fits the {duration:.1f} s of audio (wrong file or not speech?)",
        )
    return _to_analysis(script_words, aligned, duration)


def _to_analysis(script_words: list[ScriptWord], aligned: list[TokenAlignment], duration: float) -> SpeechAnalysis:
    words: list[WordTiming] = []
    spoken: list[bool] = []
    k = 0
    prev_end = 0.0
    for sw in script_words:
        parts = aligned[k : k + len(sw.tokens)]
        k += len(sw.tokens)
        said = [p for p in parts if p.spoken]
        if said:
            start, end = said[0].start, said[-1].end
            known = [p.score for p in parts if p.score is not None]
            score = float(np.mean(known)) if known else None
        else:  # punctuation-only words and unspoken words sit at the previous word's end
            start = end = prev_end
            score = 0.0 if parts else None
        words.append(
            WordTiming(
                word=sw.text,
                start=round(start, 3),
                end=round(min(end, duration), 3),
                score=None if score is None else round(score, 3),
            )
        )
        spoken.append(bool(said) or not parts)
        prev_end = words[-1].end

    missing = [i for i, (w, s) in enumerate(zip(words, spoken, strict=True)) if not s]
    low_fit = []
    for i, j in _low_runs(words, spoken):
        mean = np.mean([w.score or 0.0 for w in words[i : j + 1]])
        low_fit.append(
            f"low_word_fit: words {i + 1}-{j + 1} {_quote([w.word for w in words[i : j + 1]])} at "
            f"{words[i].start:.1f}-{words[j].end:.1f} s match the audio poorly (score {mean:.2f})"
        )
    return judge_fit(ALIGNER, words, missing, mismatch_fit=MISMATCH_FIT, how_missing="not found in the audio",
                     extra_flags=low_fit)


def empty_script(aligner: str) -> SpeechAnalysis:
    """What every aligner answers for a script with nothing to align: no timings, flagged."""
    return SpeechAnalysis(
        aligner=aligner,
        approximate=True,
        words=[],
        flags=["empty_script: the script has no words to align; cuts will be approximate"],
    )


def require_sound(audio: np.ndarray, sample_rate: int, script_words: int) -> None:
    """Refuse audio too short or too quiet to hold speech (RowFailure on the audio column)."""
    level = _rms_dbfs(audio) if len(audio) else -200.0
    if len(audio) < sample_rate // 10 or level < SILENCE_DBFS:
        raise RowFailure(
            "audio",
            f"no speech to align: {len(audio) / sample_rate:.2f} s of audio at {level:.0f} dBFS RMS "
            f"for a script of {script_words} words",
        )


def judge_fit(
    aligner: str,
    words: list[WordTiming],
    missing: list[int],
    *,
    mismatch_fit: float,
    how_missing: str,
    extra_flags: Sequence[str] = (),
) -> SpeechAnalysis:
    """The verdict every aligner gives the same way: fit score (mean word score), the words not
    spoken, and whether the audio says this script at all (then the timings are approximate).

    The mismatch flags come last so a reader of the report sees the conclusion after its evidence.
    """
    scored = [w.score for w in words if w.score is not None]
    fit = float(np.mean(scored)) if scored else 0.0
    flags: list[str] = []
    if missing:
        shown = ", ".join(f"'{words[i].word}' (near {words[i].start:.1f} s)" for i in missing[:6])
        flags.append(
            f"words_not_spoken: {len(missing)} of {len(words)} script words {how_missing}: "
            f"{shown}{' …' if len(missing) > 6 else ''}"
        )
    flags.extend(extra_flags)
    share = len(missing) / len(words)
    mismatch = fit < mismatch_fit or share >= MISMATCH_SKIPPED
    if mismatch:
        flags.append(_worst_stretch(words))
        flags.append(
            f"audio_script_mismatch: fit {fit:.2f} (threshold {mismatch_fit}), {share:.0%} of "
            f"{len(words)} words not found (threshold {MISMATCH_SKIPPED:.0%}): the audio does not say this "
            "script (wrong file, another language, or no speech)"
        )
    return SpeechAnalysis(aligner=aligner, approximate=mismatch, words=words, fit_score=round(fit, 3), flags=flags)


def align_row(
    audio_16k: np.ndarray,
    script: str,
    *,
    sample_rate: int = MODEL_SAMPLE_RATE,
    model_folder: str | None = None,
    device: str = "cpu",
) -> SpeechAnalysis:
    """Align with the CTC model in ``model_folder`` (tasks/align_ctc.py, loaded once per process) when
    one is given, else with the offline aligner (``align_words``)."""
    if not model_folder:
        return align_words(audio_16k, script, sample_rate=sample_rate)
    if sample_rate != MODEL_SAMPLE_RATE:
        raise ValueError(f"align_row takes {MODEL_SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
    from tasks.align_ctc import cached_ctc_model  # torch and transformers load only when a model is used

    return cached_ctc_model(model_folder, device).align(audio_16k, script)


def alignment_to_json(analysis: SpeechAnalysis) -> dict:
    """The ``s2v-batch align --json`` document: {"words": [{"word", "start", "end", "score"}, ...]}."""
    return {"words": [{"word": w.word, "start": w.start, "end": w.end, "score": w.score} for w in analysis.words]}
