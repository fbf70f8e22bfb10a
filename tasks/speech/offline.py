"""The offline forced aligner (pocketsphinx with its bundled English model, no downloaded model).

Method (chosen by measurement, see docs/benchmarks.md "Offline aligner"):

1. The script is split into words at whitespace; each word is expanded into the
   tokens a speaker says (``tasks/speech/script.py``) and each token gets a pronunciation
   from the CMU dictionary that ships in the ``pocketsphinx`` wheel, or from letter rules
   when it is not there.
2. Forced alignment: a left-to-right grammar of every token, with optional silence between
   them, decoded with pocketsphinx's bundled US-English acoustic model over audio given a
   noise floor (NOISE_FLOOR_DB): in one pass for audio up to FORCED_WHOLE_S, else chunk by
   chunk. Where no forced path exists (a script with words the audio lacks, say), a grammar
   where tokens may be skipped anchors the rest, and the skipped tokens are forced back in
   between their anchored neighbours (``align_tokens``).
3. A token is "not found" only where the audio lacks it, with the reason (``_verify``).
4. Word edges move onto the audio's own pauses and onsets (``activity.snap_to_pauses``).
5. The fit score (``tasks/speech/fit.py``): a free phone loop decodes the same audio, and each
   aligned token scores how well the phones heard in its frames match its dictionary phones.

Flags and failures are the shared ones (``tasks/speech/verdict.py``), plus ``unscripted_speech``
(``_overlong``); unspoken words score 0.
"""
from dataclasses import dataclass, field

import numpy as np

from tasks.records import MODEL_SAMPLE_RATE, RowFailure, SpeechAnalysis, WordTiming
from tasks.speech.activity import MIN_QUIET_S, Activity, analyse, snap_to_pauses
from tasks.speech.fit import MISMATCH_FIT, fit_windows, phone_loop, token_score
from tasks.speech.pcm import Pcm16, floored_pcm
from tasks.speech.repair import _fill, _phones, _verify
from tasks.speech.samples import AudioInput, mono_16k
from tasks.speech.script import ScriptWord, normalize_script
from tasks.speech.search import _add_words, _chunk_pass, _decoders, _forced_whole
from tasks.speech.sphinx import FRAME_RATE
from tasks.speech.verdict import empty_script, judge_fit, low_fit_flags, require_sound

ALIGNER = "pocketsphinx-en-us"


@dataclass
class TokenAlignment:
    token: str
    start: float
    end: float
    spoken: bool
    score: float | None
    heard: list[str] = field(default_factory=list)
    note: str | None = None
    """Why a token was not found, or how it was placed when the grammar skipped it."""


FORCED_WHOLE_S = 60.0
"""Audio up to this long is first force-aligned in one pass (a few seconds at most)."""


def align_tokens(pcm16: Pcm16, tokens: list[str], num_frames: int, act: Activity) -> list[TokenAlignment] | None:
    """Align tokens to 16 kHz s16 PCM; None when no path through the grammar fits the audio.

    1. Forced alignment: every token, none skipped, over the whole audio up to FORCED_WHOLE_S,
       else chunk by chunk (``_chunk_pass``; a chunk with no forced path gets a grammar where
       tokens may be skipped, and the tokens it skips are force-aligned again with their
       neighbours or spread over the sound between them: ``_fill``).
    2. A token is "not found" only when the audio lacks it (``_verify``): the forced path lays it
       over quiet audio, or squeezes it to the HMM minimum and a grammar where it may be left
       out, decoded over its neighbourhood, leaves it out.
    3. Word edges are moved to where the audio itself falls quiet (``activity.snap_to_pauses``).
    4. The phone loop scores each found token (the fit: ``tasks/speech/fit.py``).
    """
    dec = _decoders()
    vocab = {}
    for d in dec[1:]:
        vocab = _add_words(d, tokens)
    whole = num_frames <= FORCED_WHOLE_S * FRAME_RATE
    placed = _forced_whole(dec.forced, dec.retry, pcm16, tokens, num_frames) if whole else None
    notes: dict[int, str] = {}
    if placed is None:
        chunked = _chunk_pass(dec, pcm16, tokens, num_frames, forced=not whole)
        if chunked is None:
            return None
        placed, gaps = chunked
        if gaps:
            notes = _fill((dec.forced, dec.retry), pcm16, tokens, placed, num_frames, act, vocab)
    notes.update(_verify(dec.skippable, pcm16, tokens, placed, act, vocab, num_frames))
    order = sorted(placed)
    refined = snap_to_pauses([(placed[k][0] / FRAME_RATE, placed[k][1] / FRAME_RATE) for k in order], act)
    spans = dict(zip(order, refined, strict=True))
    heard = phone_loop(dec.loop, pcm16, num_frames)
    pauses = tuple(edge / act.sample_rate for edge in act.quiet_runs())
    windows = fit_windows(num_frames)
    out: list[TokenAlignment] = []
    last_end = 0.0
    for k, tok in enumerate(tokens):
        if k not in placed:
            out.append(TokenAlignment(tok, last_end, last_end, spoken=False, score=0.0, note=notes.get(k)))
            continue
        sf, ef, variant = placed[k]
        in_word, score = token_score((dec.forced.lookup_word(variant) or vocab[tok]).split(), heard, sf, ef, windows)
        start, end = spans[k]
        note = notes.get(k) or _overlong(start, end, _phones(tok, vocab), pauses)
        out.append(TokenAlignment(tok, start, end, spoken=True, score=score, heard=in_word, note=note))
        last_end = end
    return out


MAX_S_PER_PHONE = 0.2
OVERLONG_SLACK_S = 0.4
"""A word is longer than any speaker says it beyond MAX_S_PER_PHONE a phone plus OVERLONG_SLACK_S
(espeak-ng at 110 words a minute: about 0.13 s a phone)."""
OVERLONG = "holds more than this word"


def _overlong(start: float, end: float, phones: int, pauses: tuple[np.ndarray, np.ndarray]) -> str | None:
    """Why the span [start, end) a word was aligned to holds more speech than the word, or None.

    A forced alignment stretches a script word over spoken words the script lacks: the span is
    then longer than the word's phones can last, or holds a pause (``pauses``: the audio's quiet
    runs of MIN_QUIET_S, in seconds, which no spoken word holds; tasks/speech/activity.py)."""
    lo, hi = pauses
    k = int(np.searchsorted(hi, start))  # the first pause that ends after the word starts
    pause = max((min(hi[j], end) - max(lo[j], start) for j in range(k, np.searchsorted(lo, end))), default=0.0)
    if end - start > MAX_S_PER_PHONE * phones + OVERLONG_SLACK_S or pause >= MIN_QUIET_S:
        held = f" and a {pause:.2f} s pause" if pause >= MIN_QUIET_S else ""
        return f"{OVERLONG}: {end - start:.2f} s for {phones} phones{held}"
    return None



# --------------------------------------------------------------------------- the aligner


def align_words(audio_16k: AudioInput, script: str, *, sample_rate: int = MODEL_SAMPLE_RATE) -> SpeechAnalysis:
    """Align ``script`` to mono float audio at 16 kHz (values in [-1, 1]), or to a mono 16 kHz sound file,
    read a block at a time (memory does not grow with its length).

    Returns one WordTiming per whitespace-separated script word, in order, in seconds,
    with a score in [0, 1] (phone agreement between the script and what was heard);
    ``fit_score`` is the mean over the script. Raises ValueError for audio that is not
    16 kHz mono and RowFailure as described in ``tasks/speech/verdict.py``.
    """
    samples = mono_16k(audio_16k, sample_rate, "align_words")
    duration = samples.duration_s
    script_words: list[ScriptWord] = normalize_script(script or "")
    tokens = [t for w in script_words for t in w.tokens]
    if not tokens:
        return empty_script(ALIGNER)
    require_sound(samples, sample_rate, len(script_words))
    num_frames = int(round(duration * FRAME_RATE))
    act = analyse(samples)
    with floored_pcm(samples, act.speech_db) as pcm16:
        aligned = align_tokens(pcm16, tokens, num_frames, act)
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
        notes = [p.note for p in parts if p.note]
        words.append(
            WordTiming(
                word=sw.text,
                start=round(start, 3),
                end=round(min(end, duration), 3),
                score=None if score is None else round(score, 3),
                found=bool(said) or not parts,
                note=notes[0] if notes else None,
            )
        )
        spoken.append(bool(said) or not parts)
        prev_end = words[-1].end
    missing = [i for i, (w, s) in enumerate(zip(words, spoken, strict=True)) if not s]
    unmatched = sum(1 for w in words if w.note)  # skipped by the grammar: forced back in, or not found
    long = [w for w in words if w.note and w.note.startswith(OVERLONG)]
    extra = low_fit_flags(words, spoken)
    if long:
        shown = ", ".join(f"'{w.word}' at {w.start:.1f}-{w.end:.1f} s ({w.note.removeprefix(OVERLONG + ': ')})"
                          for w in long[:6])  # fmt: skip
        extra.append(f"unscripted_speech: {len(long)} script words span more speech than they say: {shown}"
                     f"{' …' if len(long) > 6 else ''}; the audio says words the script lacks there")  # fmt: skip
    return judge_fit(ALIGNER, words, missing, mismatch_fit=MISMATCH_FIT, how_missing="not found in the audio",
                     extra_flags=extra, unmatched=unmatched)
