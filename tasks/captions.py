"""Captions from word timings: cue building, SRT and WebVTT.

Cue rules (the usual broadcast/streaming style guides): at most `max_chars` characters a
line and `max_lines` lines a cue, each cue shown `min_s` to `max_s` seconds, cues break
preferably at sentence ends, then at clause punctuation and pauses, and lines are balanced.

Cue boundaries are chosen by a small dynamic programme over the words (optimal
segmentation under a cost), not greedily: a greedy filler breaks mid-phrase as soon as a
line is full, while the optimum can give up a little fill to break at a comma or pause.
No caption library we could find does timing-aware segmentation from word timings
(pysrt/webvtt-py only read and write files), so this is hand-written; the file formats
are simple enough to write directly.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from tasks.records import Cue, Segment, WordTiming
from tasks.storage import atomic_local

SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*$")
CLAUSE_END = re.compile(r"[,;:—–-][\"'”’)\]]*$")
PAUSE_S = 0.35
"""A silence between words at least this long is a natural place for a cue break."""
LONG_PAUSE_S = 0.8
"""A silence this long is as good a break as a sentence end."""
LINGER_S = 0.3
"""How long a cue may stay up after its last word ends (if the next cue allows)."""


# --- line layout -----------------------------------------------------------------------


def _line_count_greedy(lengths: list[int], max_chars: int) -> int:
    """Fewest lines the words need (greedy fill is optimal for the count)."""
    lines, cur = 0, -1
    for n in lengths:
        if cur >= 0 and cur + 1 + n <= max_chars:
            cur += 1 + n
        else:
            lines += 1
            cur = n
    return lines


def layout_lines(words: list[str], *, max_chars: int = 42, max_lines: int = 2) -> list[str]:
    """Break a cue's words into the fewest lines that fit, as balanced as possible.

    Among partitions into that many lines, the one with the shortest longest line wins,
    where a break after punctuation counts as a few characters shorter.
    A word longer than `max_chars` gets its own line.
    """
    if not words:
        return []
    lengths = [len(w) for w in words]
    n_lines = min(_line_count_greedy(lengths, max_chars), max(max_lines, 1))
    if n_lines <= 1:
        return [" ".join(words)]
    m = len(words)

    def width(i: int, j: int) -> int:  # characters of words[i:j] joined by spaces
        return sum(lengths[i:j]) + (j - i - 1)

    def break_bonus(j: int) -> float:  # breaking after words[j-1]
        w = words[j - 1]
        # In characters of line length: a punctuation break may cost this much balance.
        return 8.0 if SENTENCE_END.search(w) else 6.0 if CLAUSE_END.search(w) else 0.0

    # best[l][j]: (score, splits) for words[:j] in l lines; score = longest line - bonus.
    inf = (math.inf, ())
    best: list[list[tuple[float, tuple[int, ...]]]] = [[inf] * (m + 1) for _ in range(n_lines + 1)]
    best[0][0] = (0.0, ())
    for lines in range(1, n_lines + 1):
        for j in range(1, m + 1):
            for i in range(lines - 1, j):
                prev, splits = best[lines - 1][i]
                if prev == math.inf:
                    continue
                w = width(i, j)
                over = w > max_chars and j - i > 1
                if over:
                    continue
                score = max(prev, w) - (break_bonus(i) if i > 0 else 0.0)
                if score < best[lines][j][0]:
                    best[lines][j] = (score, (*splits, i))
    _, splits = best[n_lines][m]
    if not splits:  # cannot happen for feasible input; keep the greedy count honest
        return [" ".join(words)]
    bounds = [*splits[1:], m]
    out, start = [], 0
    for end in bounds:
        out.append(" ".join(words[start:end]))
        start = end
    return out


# --- cue segmentation ------------------------------------------------------------------


def _break_cost(words: list[WordTiming], j: int) -> float:
    """Cost of ending a cue after words[j-1] (0 is ideal)."""
    if j >= len(words):
        return 0.0
    pause = max(0.0, words[j].start - words[j - 1].end)
    text = words[j - 1].word
    if SENTENCE_END.search(text) or pause >= LONG_PAUSE_S:
        return 0.0
    if CLAUSE_END.search(text):
        return 1.0
    if pause >= PAUSE_S:
        return 1.5
    return 5.0


def _timed(words: list[WordTiming]) -> list[WordTiming]:
    """The words with time to show: a word not found in the audio (or of zero length) joins the
    text of the timed word before it (after it, at the start), so the caption still shows the
    script but no cue is ever empty of time."""
    out: list[WordTiming] = []
    pending: list[str] = []
    for w in words:
        if not w.word.strip():
            continue
        if not w.found or w.end <= w.start:
            if out:
                out[-1] = out[-1].model_copy(update={"word": f"{out[-1].word} {w.word}"})
            else:
                pending.append(w.word)
            continue
        out.append(w.model_copy(update={"word": " ".join([*pending, w.word])}) if pending else w)
        pending = []
    return out


def cues_from_words(
    words: list[WordTiming],
    *,
    max_chars: int = 42,
    max_lines: int = 2,
    min_s: float = 1.0,
    max_s: float = 7.0,
    until: float | None = None,
) -> list[Cue]:
    """Group timed words into caption cues (times in seconds, as the words').

    Hard rules: every line fits `max_chars` (a single longer word excepted), at most
    `max_lines` lines, the words of a cue span at most `max_s`, cues in order without
    overlap. Soft rules (costs): break at sentence ends, pauses and clause punctuation,
    avoid cues under `min_s` and sentences split across cues. Display times are then
    stretched to at least `min_s` where the neighbouring cues leave room, never past
    `until` (the audio's length) when given. Words not found in the audio ride along with
    the timed word before them (``_timed``): every cue lasts longer than zero.
    """
    words = _timed(words)
    n = len(words)
    if n == 0:
        return []
    lengths = [len(w.word) for w in words]
    # cost[j]: best total cost of cueing words[:j]; back[j]: start of the last cue.
    cost = [math.inf] * (n + 1)
    back = [0] * (n + 1)
    cost[0] = 0.0
    for i in range(n):
        if cost[i] == math.inf:
            continue
        inner = 0.0  # penalties for what lies inside the cue words[i:j]
        for j in range(i + 1, n + 1):
            if j > i + 1:
                if _line_count_greedy(lengths[i:j], max_chars) > max_lines:
                    break
                if words[j - 1].end - words[i].start > max_s:
                    break
                prev, cur = words[j - 2], words[j - 1]
                if SENTENCE_END.search(prev.word):
                    inner += 1.5  # two sentences share a cue
                if cur.start - prev.end >= LONG_PAUSE_S:
                    inner += 3.0  # text would sit on screen through a long silence
            span = words[j - 1].end - words[i].start
            short = 4.0 * (min_s - span) / min_s if span < min_s else 0.0
            total = cost[i] + 1.0 + inner + short + _break_cost(words, j)
            if total < cost[j]:
                cost[j] = total
                back[j] = i
    groups: list[tuple[int, int]] = []
    j = n
    while j > 0:
        groups.append((back[j], j))
        j = back[j]
    groups.reverse()

    spans = [(words[i].start, words[j - 1].end) for i, j in groups]
    cues: list[Cue] = []
    for k, ((i, j), (start, end)) in enumerate(zip(groups, spans, strict=True)):
        prev_end = cues[-1].end if cues else -math.inf
        next_start = spans[k + 1][0] if k + 1 < len(spans) else (until if until is not None else math.inf)
        start = max(start, prev_end)
        end = max(end, start)
        # Linger a little after the last word, then stretch to the minimum if room allows,
        # first forwards, then backwards into the gap after the previous cue.
        end = min(max(end + LINGER_S, start + min_s), next_start, start + max_s)
        if end - start < min_s:
            start = max(prev_end if cues else 0.0, min(start, end - min_s))
        end = min(end, start + max_s)
        text = "\n".join(layout_lines([w.word for w in words[i:j]], max_chars=max_chars, max_lines=max_lines))
        cues.append(Cue(start=round(start, 3), end=round(end, 3), text=text))
    return cues


# --- stand-in timings ------------------------------------------------------------------


def even_spread_words(script: str, duration_s: float) -> list[WordTiming]:
    """Spread the script's words over `duration_s`, each in proportion to its length.

    The stand-in used until a real alignment exists; the caller must mark the result
    approximate. Punctuation earns a short pause after the word (longer after a sentence
    end) so that the cue builder still finds the natural breaks.
    """
    tokens = script.split()
    if not tokens or duration_s <= 0:
        return []
    gaps = []
    for k, tok in enumerate(tokens):
        if k == len(tokens) - 1:
            gaps.append(0.0)
        elif SENTENCE_END.search(tok):
            gaps.append(4.0)
        elif CLAUSE_END.search(tok):
            gaps.append(2.0)
        else:
            gaps.append(0.5)
    units = sum(len(t) for t in tokens) + sum(gaps)
    scale = duration_s / units
    out, cursor = [], 0.0
    for tok, gap in zip(tokens, gaps, strict=True):
        end = cursor + len(tok) * scale
        out.append(WordTiming(word=tok, start=round(cursor, 4), end=round(min(end, duration_s), 4)))
        cursor = end + gap * scale
    return out


# --- formats ---------------------------------------------------------------------------


def _timestamp(seconds: float, sep: str) -> str:
    ms = max(0, int(round(seconds * 1000)))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _clean_lines(text: str) -> list[str]:
    # A blank line would end the cue early in both formats.
    return [line.strip() for line in text.splitlines() if line.strip()]


def to_srt(cues: list[Cue]) -> str:
    """SubRip text: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, blank line between."""
    blocks = []
    for cue in cues:
        lines = _clean_lines(cue.text)
        if not lines:
            continue
        stamp = f"{_timestamp(cue.start, ',')} --> {_timestamp(cue.end, ',')}"
        blocks.append("\n".join([str(len(blocks) + 1), stamp, *lines]))
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def _vtt_escape(line: str) -> str:
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_webvtt(cues: list[Cue]) -> str:
    """WebVTT text: `WEBVTT` header, `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues, text escaped."""
    blocks = ["WEBVTT"]
    for cue in cues:
        lines = _clean_lines(cue.text)
        if not lines:
            continue
        stamp = f"{_timestamp(cue.start, '.')} --> {_timestamp(cue.end, '.')}"
        blocks.append("\n".join([stamp, *(_vtt_escape(line) for line in lines)]))
    return "\n\n".join(blocks) + "\n"


def write_captions(cues: list[Cue], dest_stem: str | Path) -> dict[str, Path]:
    """Write `<dest_stem>.srt` and `<dest_stem>.vtt` atomically; returns format -> path."""
    out = {}
    for fmt, text in (("srt", to_srt(cues)), ("vtt", to_webvtt(cues))):
        path = Path(f"{dest_stem}.{fmt}")  # not with_suffix: ids may contain dots
        with atomic_local(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        out[fmt] = path
    return out


def cues_for_segment(cues: list[Cue], segment: Segment) -> list[Cue]:
    """The cues overlapping `segment`, clipped to it and shifted into segment time."""
    out = []
    for cue in cues:
        start = max(cue.start, segment.start_s)
        end = min(cue.end, segment.end_s)
        if end - start <= 1e-3:
            continue
        out.append(Cue(start=round(start - segment.start_s, 3), end=round(end - segment.start_s, 3), text=cue.text))
    return out
