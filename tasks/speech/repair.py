"""Repairs after the offline search: skipped tokens forced back in or spread, tokens the audio lacks dropped."""

from __future__ import annotations

import functools

import numpy as np
from pocketsphinx import Decoder

from tasks.speech.activity import Activity
from tasks.speech.pcm import Pcm16
from tasks.speech.search import Placed, _decode_chunk
from tasks.speech.sphinx import BYTES_PER_FRAME, FRAME_RATE

FILL_PAD_FRAMES = 10
"""The forced pass decodes from this many frames before the previous aligned token to as many
after the next one."""

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
