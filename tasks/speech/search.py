"""The offline aligner's forced-alignment search: pocketsphinx decoders, grammars, and long audio chunk by chunk."""

from __future__ import annotations

import re
import threading
from typing import NamedTuple

import numpy as np
from pocketsphinx import Decoder

from tasks.speech import sphinx
from tasks.speech.fit import phone_loop_decoder
from tasks.speech.pcm import Pcm16
from tasks.speech.pronounce import pronounce
from tasks.speech.samples import BLOCK
from tasks.speech.sphinx import BYTES_PER_FRAME, FILLERS, FRAME_RATE, decode

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


CHUNK_ABOVE_S = 30.0
CHUNK_S = 15.0
CHUNK_SEARCH_S = 4.0
"""Audio longer than CHUNK_ABOVE_S is aligned in chunks of CHUNK_S +- CHUNK_SEARCH_S, cut at its quietest point."""
CHUNK_TAIL_S = 2.0
"""Words ending in a chunk's last CHUNK_TAIL_S are decoded again with the next chunk."""
MAX_TOKENS_PER_S = 6.0
"""Fastest speech rate planned for (spoken tokens per second) when offering a chunk part of the script."""
END_PROB = 0.5
"""A chunk other than the last may end after any token: cheap, since its audio decides where it ends."""
RETRY_BEAMS = {"beam": 1e-64, "pbeam": 1e-64, "wbeam": 1e-64}
"""Beams of the second try of a forced (no-skip) pass that found no path with ALIGN_OPTIONS'."""

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


def _forced_whole(decoder: Decoder, retry: Decoder, pcm16: Pcm16, tokens: list[str], num_frames: int) -> Placed | None:
    """Every token force-aligned over the whole audio (default beams, then wider); None when no path survives."""
    whole = pcm16[:]  # at most FORCED_WHOLE_S of audio
    for d in (decoder, retry):
        found = _decode_chunk(d, whole, tokens, last=True, skip=False)
        if found is not None and len(found) == len(tokens):
            return {k: (sf, min(ef + 1, num_frames), v) for k, (_, sf, ef, v) in enumerate(found)}
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
