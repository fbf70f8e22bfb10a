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

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
from pocketsphinx import Decoder

from tasks.records import MODEL_SAMPLE_RATE, RowFailure, SpeechAnalysis, WordTiming
from tasks.speech import sphinx
from tasks.speech.activity import MIN_QUIET_S, Activity, analyse, snap_to_pauses
from tasks.speech.fit import MISMATCH_FIT, fit_windows, phone_loop, phone_loop_decoder, token_score
from tasks.speech.samples import BLOCK, AudioInput, Samples, mono_16k
from tasks.speech.script import ScriptWord, normalize_script
from tasks.speech.sphinx import BYTES_PER_FRAME, FILLERS, FRAME_RATE, decode
from tasks.speech.verdict import empty_script, judge_fit, low_fit_flags, require_sound

ALIGNER = "pocketsphinx-en-us"
SKIP_PROB = 1e-3
"""Prior of a script token not being spoken: small, so a token is only skipped when the audio says so."""
SIL_PROB = 1.0
"""Optional silence between tokens; 1.0 measured best (pauses otherwise get absorbed into words)."""
# Pruning beams stay at pocketsphinx's defaults: tighter beams (1e-20) ran ~4x faster on
# word-by-word speech but, with skippable words in the grammar, silently derailed on
# continuous synthetic speech (skipping words instead of failing).
SKIP_OPTIONS = {"topn": 2}
"""Grammar passes use the two best Gaussians per senone: same boundary errors on
bench/align_accuracy.py's corpus, faster."""
ALIGN_OPTIONS = {**SKIP_OPTIONS, "wbeam": 1e-48, "bestpath": False}
"""Forced passes (every token said) get a word-exit beam as wide as the HMM beams and no lattice
best-path pass, as pocketsphinx's maintainers advise for alignment (cmusphinx/pocketsphinx #318,
#464): with the default, narrower word-exit beam the path that had said every word was pruned at
the last frame ("Final result does not match the grammar") and the pass failed on clean speech at
320 words a minute. Grammars that may skip tokens keep the defaults, which anchored the words of
scripts with extra words better (tests/speech/test_offline.py)."""
CHUNK_BEAMS = {"beam": 1e-120, "pbeam": 1e-120, "wbeam": 1e-120}
"""Chunks of long audio are force-aligned with far wider beams: with ALIGN_OPTIONS' a 12-minute talk
in an accent far from the model's (espeak-ng's West Midlands voice) lost its way inside a 15 s chunk
(words up to 3 s late), with these it did not (bench/align_accuracy.py's long talks), for about 20%
more time in these passes (a left-to-right grammar keeps few states active). The whole-file pass
keeps the narrower beams: there a path that cannot survive them is evidence (a script with words the
audio lacks, or a wrong file), which the skippable grammar then sorts out; with wide beams it forced
such words in and pushed spoken ones into the pauses."""


# --------------------------------------------------------------------------- pronunciations

# Letter-to-sound rules for words the CMU dictionary lacks (brand names, new coinages).
# Hand-written because no grapheme-to-phoneme package on PyPI ships its model offline
# without extra downloads; the timing anchors of the surrounding dictionary words
# matter more than exact phones here. Longest grapheme first.
_G2P = [
    ("tion", "SH AH N"),
    ("sion", "ZH AH N"),
    ("tch", "CH"),
    ("sch", "S K"),
    ("igh", "AY"),
    ("ough", "AO"),
    ("ch", "CH"),
    ("sh", "SH"),
    ("th", "TH"),
    ("ph", "F"),
    ("wh", "W"),
    ("ck", "K"),
    ("ng", "NG"),
    ("qu", "K W"),
    ("gh", ""),
    ("ee", "IY"),
    ("ea", "IY"),
    ("oo", "UW"),
    ("ou", "AW"),
    ("ow", "OW"),
    ("oi", "OY"),
    ("oy", "OY"),
    ("ai", "EY"),
    ("ay", "EY"),
    ("au", "AO"),
    ("aw", "AO"),
    ("ie", "IY"),
    ("ei", "EY"),
    ("ey", "IY"),
    ("er", "ER"),
    ("ir", "ER"),
    ("ur", "ER"),
    ("ar", "AA R"),
    ("or", "AO R"),
    ("a", "AE"),
    ("b", "B"),
    ("c", "K"),
    ("d", "D"),
    ("e", "EH"),
    ("f", "F"),
    ("g", "G"),
    ("h", "HH"),
    ("i", "IH"),
    ("j", "JH"),
    ("k", "K"),
    ("l", "L"),
    ("m", "M"),
    ("n", "N"),
    ("o", "AA"),
    ("p", "P"),
    ("q", "K"),
    ("r", "R"),
    ("s", "S"),
    ("t", "T"),
    ("u", "AH"),
    ("v", "V"),
    ("w", "W"),
    ("x", "K S"),
    ("y", "IY"),
    ("z", "Z"),
]
_LETTER_NAMES = {
    "a": "EY",
    "b": "B IY",
    "c": "S IY",
    "d": "D IY",
    "e": "IY",
    "f": "EH F",
    "g": "JH IY",
    "h": "EY CH",
    "i": "AY",
    "j": "JH EY",
    "k": "K EY",
    "l": "EH L",
    "m": "EH M",
    "n": "EH N",
    "o": "OW",
    "p": "P IY",
    "q": "K Y UW",
    "r": "AA R",
    "s": "EH S",
    "t": "T IY",
    "u": "Y UW",
    "v": "V IY",
    "w": "D AH B AH L Y UW",
    "x": "EH K S",
    "y": "W AY",
    "z": "Z IY",
}


def letter_rules(word: str) -> str:
    """ARPAbet guess for a word from spelling alone."""
    w = re.sub(r"[^a-z]", "", word.lower())
    w = re.sub(r"([bcdfgklmnprstvz])\1", r"\1", w)  # doubled consonants sound once
    if len(w) > 3 and w.endswith("e") and w[-2] not in "aeiou":
        w = w[:-1]  # silent final e
    phones: list[str] = []
    i = 0
    while i < len(w):
        for graph, ph in _G2P:
            if w.startswith(graph, i):
                if graph == "c" and w[i + 1 : i + 2] in ("e", "i", "y"):
                    ph = "S"
                if graph == "y" and i == 0:
                    ph = "Y"
                phones += ph.split()
                i += len(graph)
                break
        else:
            i += 1
    return " ".join(phones) or "AH"


def pronounce(token: str, lookup: callable) -> str:
    """Pronunciation of an out-of-dictionary token: acronyms spelled, compounds split, else letter rules."""
    if len(token) <= 4 and not re.search(r"[aeiouy]", token):
        return " ".join(_LETTER_NAMES[c] for c in token if c in _LETTER_NAMES)
    # "smartwatch" = "smart" + "watch": split into two dictionary words where possible.
    for cut in range(len(token) - 3, 2, -1):
        head, tail = lookup(token[:cut]), lookup(token[cut:])
        if head and tail:
            return f"{head} {tail}"
    # A known stem with a suffix: "vlogs", "upskilling".
    for suffix, phones in (("'s", "Z"), ("s", "Z"), ("ed", "D"), ("ing", "IH NG"), ("er", "ER"), ("ly", "L IY")):
        if token.endswith(suffix) and (stem := lookup(token[: -len(suffix)])):
            return f"{stem} {phones}"
    return letter_rules(token)


# --------------------------------------------------------------------------- decoding


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


CHUNK_ABOVE_S = 30.0
CHUNK_S = 15.0
CHUNK_SEARCH_S = 4.0
"""Audio longer than CHUNK_ABOVE_S is aligned in chunks of CHUNK_S +- CHUNK_SEARCH_S, cut at its quietest point."""
CHUNK_TAIL_S = 2.0
"""Words ending in a chunk's last CHUNK_TAIL_S are decoded again with the next chunk."""
FORCED_WHOLE_S = 60.0
"""Audio up to this long is first force-aligned in one pass (a few seconds at most)."""
MAX_TOKENS_PER_S = 6.0
"""Fastest speech rate planned for (spoken tokens per second) when offering a chunk part of the script."""
END_PROB = 0.5
"""A chunk other than the last may end after any token: cheap, since its audio decides where it ends."""
RETRY_BEAMS = {"beam": 1e-64, "pbeam": 1e-64, "wbeam": 1e-64}
"""Beams of the second try of a forced (no-skip) pass that found no path with ALIGN_OPTIONS'."""
FILL_PAD_FRAMES = 10
"""The forced pass decodes from this many frames before the previous aligned token to as many
after the next one."""
NOISE_FLOOR_DB = 45.0
"""Audio is decoded over a noise floor this far under its speech level (white noise; about -60 dBFS for
speech normalized to -16 LUFS). The acoustic model learned silence from recordings whose floor sits
some 40-50 dB under the voice; TTS writes exact digital silence, and speech joined by silence far
below that floor made the forced search derail: the silence model swallowed whole words and the
path ran out of audio (slow speech, long pauses and 320 words a minute failed outright with a floor
at -80 dBFS; bench/align_accuracy.py, docs/benchmarks.md). Only the decoders hear the added floor;
the energy detector (tasks/speech/activity.py) reads the audio as it is."""


_local = threading.local()


class Decoders(NamedTuple):
    """One thread's decoders (loading the model takes ~0.1 s each)."""

    loop: Decoder
    """The free phone loop (the fit)."""
    forced: Decoder
    """Grammars where every token is said (ALIGN_OPTIONS)."""
    retry: Decoder
    """The same with wider beams (RETRY_BEAMS), for a forced pass that found no path."""
    chunks: Decoder
    """The same with the beams of long audio's chunks (CHUNK_BEAMS)."""
    skippable: Decoder
    """Grammars where tokens may be skipped or left out (SKIP_OPTIONS)."""


def _decoders() -> Decoders:
    """This thread's decoders: pocketsphinx decoders are not thread-safe, hence one set per thread.

    Words added to a decoder's dictionary stay, which is harmless (they are only used when a grammar
    names them).
    """
    if not hasattr(_local, "decoders"):
        options = {"silprob": SIL_PROB}
        _local.decoders = Decoders(
            loop=phone_loop_decoder(),
            forced=sphinx.decoder(**options, **ALIGN_OPTIONS),
            retry=sphinx.decoder(**options, **{**ALIGN_OPTIONS, **RETRY_BEAMS}),
            chunks=sphinx.decoder(**options, **{**ALIGN_OPTIONS, **CHUNK_BEAMS}),
            skippable=sphinx.decoder(**options, **SKIP_OPTIONS),
        )
    return _local.decoders


def _add_words(decoder: Decoder, tokens: list[str]) -> dict[str, str]:
    """Pronunciations of the tokens (dictionary first, else ``pronounce``), added to ``decoder``."""
    vocab: dict[str, str] = {}
    for tok in dict.fromkeys(tokens):
        phones = decoder.lookup_word(tok)
        if phones is None:
            decoder.add_word(tok, pronounce(tok, decoder.lookup_word), update=False)
            phones = decoder.lookup_word(tok)
        vocab[tok] = phones or ""
    return vocab


Placed = dict[int, tuple[int, int, str]]
"""Token index -> (first frame, end frame exclusive, pronunciation variant decoded)."""


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


def _forced_whole(decoder: Decoder, retry: Decoder, pcm16: Pcm16, tokens: list[str], num_frames: int) -> Placed | None:
    """Every token force-aligned over the whole audio (default beams, then wider); None when no path survives."""
    whole = pcm16[:]  # at most FORCED_WHOLE_S of audio
    for d in (decoder, retry):
        found = _decode_chunk(d, whole, tokens, last=True, skip=False)
        if found is not None and len(found) == len(tokens):
            return {k: (sf, min(ef + 1, num_frames), v) for k, (_, sf, ef, v) in enumerate(found)}
    return None


def _verify(
    decoder: Decoder, pcm16: Pcm16, tokens: list[str], placed: Placed, act: Activity, vocab: dict[str, str],
    num_frames: int,
) -> dict[int, str]:
    """Drop from ``placed`` the tokens the audio lacks; their notes.

    A forced path lays a token the audio lacks over quiet audio (``_absent``), or squeezes it into
    the least time its HMM allows between the words around it. So it does a short spoken word in
    fluent speech ("the", "at", "in" in 60-70 ms), which the acoustic model cannot tell from its
    neighbours: only tokens of at least LEAVE_OUT_MIN_PHONES phones at the HMM minimum are suspects.
    Each run of suspects is decoded again over its neighbourhood with a grammar where each may be
    left out (even odds); a token left out is not found when the words around it take its frames
    (their sound explains them). Frames left to silence though the audio has sound there keep the
    token: the sound is a spoken word the model hears poorly (espeak-ng at 320 words a minute).
    """
    notes: dict[int, str] = {}
    suspects: list[int] = []
    for i in sorted(placed):
        sf, ef, _ = placed[i]
        phones = _phones(tokens[i], vocab)
        why = _absent(sf, ef, phones, act)
        if why:
            notes[i] = why
            del placed[i]
        elif phones >= LEAVE_OUT_MIN_PHONES and ef - sf <= MIN_FRAMES_PER_PHONE * phones + 1:
            suspects.append(i)
    for run in _runs_of(suspects):
        first, last = max(run[0] - 1, 0), min(run[-1] + 2, len(tokens))
        if first not in placed or last - 1 not in placed:
            continue
        a = max(0, placed[first][0] - FILL_PAD_FRAMES)
        b = min(num_frames, placed[last - 1][1] + FILL_PAD_FRAMES)
        odds = [LEAVE_OUT_PROB if i in run else 0.0 for i in range(first, last)]
        found = _decode_chunk(decoder, pcm16[a * BYTES_PER_FRAME : b * BYTES_PER_FRAME], tokens[first:last],
                              last=True, skip=odds)  # fmt: skip
        if found is None:
            continue
        kept = _match(tokens[first:last], [w for w, *_ in found], odds)
        said = np.zeros(b - a, dtype=bool)  # frames the decoded words take
        for _, sf, ef, _ in found:
            said[sf : ef + 1] = True
        for i in run:
            sf, ef, _ = placed[i]
            if i - first in kept or said[sf - a : ef - a].mean() < 0.5:
                continue
            del placed[i]
            span = f"{sf / FRAME_RATE:.2f}-{ef / FRAME_RATE:.2f} s ({(ef - sf) * 1000 // FRAME_RATE} ms"
            notes[i] = (f"not found: a forced alignment can only squeeze it into {span} for "
                        f"{_phones(tokens[i], vocab)} phones), and a grammar where it may be left out gives "
                        "that time to the words around it")  # fmt: skip
    return notes


def _phones(token: str, vocab: dict[str, str]) -> int:
    return max(1, len(vocab.get(token, "").split()))


LEAVE_OUT_PROB = 0.5
"""Odds of leaving a squeezed token out when it is decoded again: even, so the audio decides."""


def _runs_of(indices: list[int]) -> list[list[int]]:
    """Sorted indices grouped into runs of consecutive ones."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][-1] == i - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _match(tokens: list[str], decoded: list[str], odds: list[float]) -> set[int]:
    """Positions in ``tokens`` of the ``decoded`` words of a left-to-right grammar where a token with
    odds > 0 may be left out (a token kept where it and a forced neighbour spell alike, when that fits)."""

    @functools.cache
    def fits(p: int, d: int) -> bool:  # tokens[p:] can say decoded[d:]
        if p == len(tokens):
            return d == len(decoded)
        said = d < len(decoded) and decoded[d] == tokens[p] and fits(p + 1, d + 1)
        return said or (odds[p] > 0 and fits(p + 1, d))

    kept: set[int] = set()
    d = 0
    for p, tok in enumerate(tokens):
        if d < len(decoded) and decoded[d] == tok and fits(p + 1, d + 1):
            kept.add(p)
            d += 1
    return kept


def _absent(sf: int, ef: int, phones: int, act: Activity) -> str | None:
    """Why a token forced into frames [sf, ef) is surely not in the audio, or None when it may well be.

    It is not when the frames are mostly quiet and their sound is too short for its phones
    (MIN_PHONE_S each). A forced path often stretches a phrase's first word back over the pause
    before it; the word's own sound is still there, and the edges are snapped to it later.
    """
    span = f"{sf / FRAME_RATE:.2f}-{ef / FRAME_RATE:.2f} s"
    share = act.quiet_share(sf / FRAME_RATE, ef / FRAME_RATE)
    sound = (1.0 - share) * (ef - sf) / FRAME_RATE
    if share >= NOT_FOUND_QUIET and sound < MIN_PHONE_S * phones:
        return (f"not found: a forced alignment lays it over {span}, {share:.0%} of which is quiet "
                f"({sound * 1000:.0f} ms of sound for {phones} phones)")  # fmt: skip
    return None


def _chunk_pass(
    dec: Decoders, pcm16: Pcm16, tokens: list[str], num_frames: int, forced: bool = True
) -> tuple[Placed, bool] | None:
    """Tokens placed chunk by chunk (long audio, or no forced path over the whole); None when nothing fits.

    Each chunk is force-aligned with the next tokens of the script (it may end after any of them);
    a chunk with no forced path (every chunk when not ``forced``) is decoded again with a grammar
    where each token may be skipped. Also returns whether any chunk needed that (its tokens are
    then placed again in ``_fill``).
    """
    placed: Placed = {}
    k = 0
    aligned_any = skipped = False
    quiet = _quietness(pcm16, num_frames)
    fa = 0
    while fa < num_frames and k < len(tokens):
        fb, last = _chunk_end(quiet, fa, num_frames)
        # The tokens this chunk can hold: at most MAX_TOKENS_PER_S of speech plus slack.
        n = len(tokens) - k if last else min(len(tokens) - k, int((fb - fa) / FRAME_RATE * MAX_TOKENS_PER_S) + 20)
        chunk = pcm16[fa * BYTES_PER_FRAME : fb * BYTES_PER_FRAME]
        found = _decode_chunk(dec.chunks, chunk, tokens[k : k + n], last, skip=False) if forced else None
        if found is None:
            found = _decode_chunk(dec.skippable, chunk, tokens[k : k + n], last, skip=True)
            skipped = True
        if not last and found:
            # Commit only words that end before the chunk's tail; the next chunk starts after the
            # last committed word and decodes the tail again, so a cut near a word cannot skew it.
            tail = fb - fa - int(CHUNK_TAIL_S * FRAME_RATE)
            found = [f for f in found if f[2] < tail]
        if not found:  # nothing of the script fits here (music, noise, or only the tail): move on
            fa = fb if last else max(fa + 1, fb - int(CHUNK_TAIL_S * FRAME_RATE))
            continue
        aligned_any = True
        for word, sf, ef, variant in found:
            # The grammar is monotone, so each decoded word is the next script token of that spelling.
            while k < len(tokens) and tokens[k] != word:
                k += 1
            if k == len(tokens):
                break
            placed[k] = (sf + fa, min(ef + fa + 1, num_frames), variant)
            k += 1
        fa = fb if last else found[-1][2] + fa + 1
    return (placed, skipped or len(placed) < len(tokens)) if aligned_any else None


def _decode_chunk(
    decoder: Decoder, pcm16: bytes, tokens: list[str], last: bool, skip: bool | list[float] = True
) -> list[tuple[str, int, int, str]] | None:
    """Decode one chunk against a left-to-right grammar of ``tokens``; None when no path fits.

    With ``skip`` every token may be skipped (epsilon transition, SKIP_PROB); a list gives each
    token its own skip probability (0: forced). A chunk other than the last may also end after
    any token (it holds a prefix of the remaining script).
    """
    n = len(tokens)
    skips = skip if isinstance(skip, list) else [SKIP_PROB if skip else 0.0] * n
    transitions = []
    for i, (tok, p) in enumerate(zip(tokens, skips, strict=True)):
        transitions.append((i, i + 1, 1.0 - p, tok))
        if p > 0:
            transitions.append((i, i + 1, p))
        if not last and i > 0:
            transitions.append((i, n, END_PROB))
    fsg = decoder.create_fsg(f"script{n}", 0, n, transitions)
    decoder.add_fsg("script", fsg)  # replaces the previous grammar
    decoder.activate_search("script")
    decode(decoder, pcm16)
    if decoder.hyp() is None:
        return None
    return [
        (re.sub(r"\(\d+\)$", "", s.word), s.start_frame, s.end_frame, s.word)
        for s in decoder.seg()
        if s.word not in FILLERS
    ]


def _fill(
    decoders: tuple[Decoder, Decoder], pcm16: Pcm16, tokens: list[str], placed: Placed, num_frames: int,
    act: Activity, vocab: dict[str, str],
) -> dict[int, str]:
    """Place the tokens the chunk pass skipped; returns a note per token placed this way or not found.

    Each run of skipped tokens is decoded again with a forced grammar (no skipping) together with
    its aligned neighbours, over their stretch of audio (default beams, then wider HMM beams).
    The grammar skips a spoken word when it fits the acoustic model worse than the cost of a
    skip (short function words in synthetic or noisy speech); forcing it back finds where it
    is. Without a forced path the run is spread over the sound between its neighbours. A token
    stays "not found" only when the audio lacks it: the forced path lays it over quiet audio,
    or the audio between its neighbours has no sound for it.
    """
    notes: dict[int, str] = {}
    island = _islands(placed, len(tokens))
    placed.clear()
    placed.update(island)
    k = 0
    while k < len(tokens):
        if k in placed:
            k += 1
            continue
        run_end = k
        while run_end < len(tokens) and run_end not in placed:
            run_end += 1
        first, last, found = _force_run(decoders, pcm16, tokens, placed, k, run_end, num_frames)
        if found is None:
            run = list(range(k, run_end))
            prev = k - 1 if k > 0 else None
            nxt = run_end if run_end < len(tokens) else None
            gap = (placed[prev][1] if prev is not None else 0, placed[nxt][0] if nxt is not None else num_frames)
            notes.update(_spread(run, gap, tokens, placed, act, vocab))
            k = run_end
            continue
        for i, (sf, ef, variant) in zip(range(first, last), found, strict=True):
            was = placed.pop(i, None)
            why = _absent(sf, ef, _phones(tokens[i], vocab), act) if was is None else None
            if why:
                notes[i] = why
            else:
                placed[i] = (sf, ef, variant)
                if was is None and i in range(k, run_end):
                    notes[i] = "placed by forced alignment (the skippable grammar had skipped it)"
        k = max(run_end, last)
    return notes


WIDEN = 3
"""A run without a forced path between its neighbours is tried again with the neighbouring
anchored stretch on each side included, up to this many times: those anchors may be a derailed
match that left the run too little audio."""


def _force_run(
    decoders: tuple[Decoder, Decoder], pcm16: Pcm16, tokens: list[str], placed: Placed, k: int, run_end: int,
    num_frames: int,
) -> tuple[int, int, list[tuple[int, int, str]] | None]:
    """Force-align tokens [k, run_end) with their anchored neighbours; widened over neighbouring anchors
    when no path fits. Returns the token range decoded and (first frame, end frame, variant) per token."""
    first, last = k - 1, run_end + 1
    for _ in range(WIDEN + 1):
        first, last = max(first, 0), min(last, len(tokens))
        a = max(0, (placed[first][0] if first in placed else 0) - FILL_PAD_FRAMES)
        b = min(num_frames, (placed[last - 1][1] if last - 1 in placed else num_frames) + FILL_PAD_FRAMES)
        if first > 0 and first not in placed or last < len(tokens) and last - 1 not in placed:
            break  # the widened range no longer ends on anchors
        if b - a > MAX_FILL_S * FRAME_RATE:
            break
        for decoder in decoders:
            found = _decode_chunk(decoder, pcm16[a * BYTES_PER_FRAME : b * BYTES_PER_FRAME], tokens[first:last],
                                  last=True, skip=False)  # fmt: skip
            if found is not None and len(found) == last - first:
                return first, last, [(sf + a, min(ef + a + 1, num_frames), v) for _, sf, ef, v in found]
        if first == 0 and last == len(tokens):
            break
        # Take in the neighbouring anchored stretch on each side (up to the next skipped token).
        first -= 1
        while first > 0 and first - 1 in placed:
            first -= 1
        last += 1
        while last < len(tokens) and last in placed:
            last += 1
    return k, run_end, None


ISLAND = 3
"""Anchors count only in runs of at least this many consecutive script tokens: a lone token the
skippable grammar matched between skips is often another word's audio (a derailed match); the
forced pass places it again with its neighbours."""
MAX_FILL_S = 60.0
"""The longest stretch of audio one forced pass decodes (time grows faster than its length)."""
MIN_FRAMES_PER_PHONE = 3
"""The least time the acoustic model's HMMs give a phone (three states, 10 ms each)."""
LEAVE_OUT_MIN_PHONES = 4
MIN_PHONE_S = 0.03
"""Sound a spoken phone needs at the least: a skipped run with less sound than this per phone
between its neighbours is not in the audio."""


def _islands(placed: Placed, count: int) -> Placed:
    """The anchors that lie in runs of at least ISLAND consecutive tokens (all of them for a shorter script)."""
    need = min(ISLAND, count)
    keep: Placed = {}
    run: list[int] = []
    for k in range(count + 1):
        if k < count and k in placed and (not run or placed[k][0] >= placed[run[-1]][1] - 1):
            run.append(k)
            continue
        if len(run) >= need:
            keep.update({i: placed[i] for i in run})
        run = [k] if k < count and k in placed else []
    return keep


def _spread(
    run: list[int], gap: tuple[int, int], tokens: list[str], placed: Placed, act: Activity, vocab: dict[str, str]
) -> dict[int, str]:
    """Place a run no forced path holds over the sound between its neighbours (frames ``gap``), by phone count.

    Returns the notes; tokens left out of ``placed`` are not found.
    """
    per_frame = act.sample_rate // FRAME_RATE
    lo, hi = act.step(gap[0] * per_frame), act.step(max(gap[0], gap[1]) * per_frame)
    sound = np.flatnonzero(~act.quiet[lo:hi]) + lo
    phones = [_phones(tokens[i], vocab) for i in run]
    where = f"between {gap[0] / FRAME_RATE:.2f} and {gap[1] / FRAME_RATE:.2f} s"
    if len(sound) * act.hop < MIN_PHONE_S * sum(phones) * act.sample_rate:
        heard = len(sound) * act.hop / act.sample_rate
        return {i: f"not found: only {heard:.2f} s of sound {where}, too little for it" for i in run}
    first, last = sound[0] * act.hop // per_frame, (sound[-1] + 1) * act.hop // per_frame
    edges = first + np.round(np.cumsum([0, *phones]) / sum(phones) * (last - first)).astype(int)
    for i, sf, ef in zip(run, edges[:-1], edges[1:], strict=True):
        placed[i] = (int(sf), int(max(ef, sf + 1)), tokens[i])
    return {i: f"timed by spreading over the sound {where} (no forced path)" for i in run}


NOT_FOUND_QUIET = 0.8
"""A token the forced pass lays over audio at least this quiet is not in the audio."""
def _quietness(pcm16: Pcm16, num_frames: int) -> np.ndarray | None:
    """Energy per 10 ms frame averaged over 0.2 s (None for audio aligned in one piece); read a block
    of frames at a time."""
    if num_frames <= CHUNK_ABOVE_S * FRAME_RATE:
        return None
    per = BYTES_PER_FRAME // 2
    frames = min(num_frames, len(pcm16) // BYTES_PER_FRAME)
    energy = np.empty(frames, dtype=np.float32)
    step = BLOCK // per
    for a in range(0, frames, step):
        b = min(frames, a + step)
        x = np.frombuffer(pcm16[a * BYTES_PER_FRAME : b * BYTES_PER_FRAME], dtype="<i2").astype(np.float32)
        energy[a:b] = (x.reshape(b - a, per) ** 2).mean(axis=1)
    return np.convolve(energy, np.ones(20) / 20, mode="same")


def _chunk_end(quiet: np.ndarray | None, fa: int, num_frames: int) -> tuple[int, bool]:
    """End frame of the chunk starting at ``fa`` (the quietest point near fa + CHUNK_S) and whether it is the last.

    Decoding time grows faster than linearly with the length of an utterance (the grammar's
    active states pile up), so long audio is aligned in chunks of about CHUNK_S.
    """
    step, reach = int(CHUNK_S * FRAME_RATE), int(CHUNK_SEARCH_S * FRAME_RATE)
    if quiet is None or num_frames - fa <= step + reach:
        return num_frames, True
    lo, hi = fa + step - reach, min(fa + step + reach, len(quiet))
    return lo + int(np.argmin(quiet[lo:hi])), False


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
