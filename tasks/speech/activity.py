"""Where the audio itself is quiet: a voice-activity check both the aligner and the planner trust.

An energy detector over the recording's own noise floor, on numpy. Hand-written because the
job is not a binary speech/non-speech call: the aligner snaps word edges to where the level
falls to the floor, and the planner ranks candidate cuts by how quiet they are. WebRTC's VAD
(shipped in pocketsphinx and webrtcvad) answers speech/non-speech only, calls a music bed
speech throughout, and silero-vad needs torch, which the base install does not carry.

* ``level_db``: RMS level of each HOP_S step over a WINDOW_S window, in dBFS.
* ``floor_db``: the local noise floor, a low percentile of the levels in FLOOR_BLOCK_S blocks,
  taken as the lowest of the blocks within FLOOR_REACH_S (a block of continuous speech
  borrows its neighbours' floor). Steady noise and a music bed sit at this floor.
* ``quiet``: steps no louder than the floor plus QUIET_DB, nor than the loud speech level minus
  MIN_DROP_DB: no voice there. A quiet run of at least MIN_QUIET_S is a pause; the stop
  closures inside words are shorter (measured on espeak-ng words at 110 words a minute and on
  the human corpus of bench/align_accuracy.py: docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.records import MODEL_SAMPLE_RATE
from tasks.speech.samples import AudioInput, Samples

HOP_S = 0.005
WINDOW_S = 0.01
FLOOR_BLOCK_S = 2.0
FLOOR_REACH_S = 4.0
FLOOR_PERCENTILE = 10.0
QUIET_DB = 8.0
"""A step is quiet up to this far above the local floor ..."""
MIN_DROP_DB = 10.0
"""... and at least this far below the loud speech level (the 95th percentile of the levels)."""
MIN_QUIET_S = 0.25
"""The shortest quiet run counted as a pause between words."""
SILENT_DB = -90.0
"""Digital silence is counted at this level (log of zero)."""


@dataclass(frozen=True)
class Activity:
    """Per-step levels and the quiet mask of one recording; step k covers [k, k+1) * hop samples."""

    level_db: np.ndarray
    floor_db: np.ndarray
    quiet: np.ndarray
    speech_db: float
    hop: int
    """Samples per step."""
    sample_rate: int = MODEL_SAMPLE_RATE

    @property
    def num_steps(self) -> int:
        return len(self.level_db)

    def step(self, sample: int) -> int:
        return min(max(sample // self.hop, 0), max(self.num_steps - 1, 0))

    def quiet_share(self, start_s: float, end_s: float) -> float:
        """Share of [start_s, end_s) that is quiet (1.0 for an empty span)."""
        a = self.step(int(start_s * self.sample_rate))
        b = max(a + 1, self.step(int(np.ceil(end_s * self.sample_rate))))
        return float(self.quiet[a:b].mean()) if b > a else 1.0

    def quiet_runs(self, min_s: float = MIN_QUIET_S) -> tuple[np.ndarray, np.ndarray]:
        """Sample ranges [start, end) of the quiet runs at least ``min_s`` long."""
        q = np.concatenate([[False], self.quiet, [False]])
        edges = np.flatnonzero(q[1:] != q[:-1])
        starts, ends = edges[0::2], edges[1::2]
        keep = (ends - starts) * self.hop >= min_s * self.sample_rate
        return starts[keep] * self.hop, ends[keep] * self.hop

    def above_floor_db(self, sample: int, span_s: float = 0.05) -> float:
        """How far above the local floor the audio is around ``sample``: the loudest step within ±span_s/2."""
        half = max(1, int(span_s * self.sample_rate / 2 / self.hop))
        k = self.step(sample)
        a, b = max(0, k - half), min(self.num_steps, k + half + 1)
        return float((self.level_db[a:b] - self.floor_db[a:b]).max())


def levels_db(audio: AudioInput | Samples, hop: int, window: int) -> np.ndarray:
    """RMS level (dBFS) of each hop, over a window centred on it.

    From a running sum of squares kept block by block: each window's power is its sum at the window's
    end less its sum at the start, taken as a block passes them, so the samples are never held whole.
    The running sum adds in the order one cumulative sum over the whole recording would, so the levels
    are the same either way."""
    samples = Samples.of(audio)
    n = samples.num_samples
    steps = -(-n // hop)
    if steps == 0:
        return np.zeros(0)
    power = np.zeros(steps)  # sum at the window's end - sum at its start, filled as blocks pass
    offsets = (hop // 2 - window // 2, hop // 2 + window // 2)  # window edges relative to k * hop
    total, start = 0.0, 0
    for block in samples.blocks():
        x = np.asarray(block, dtype=np.float64)
        running = np.cumsum(np.concatenate([[total], x * x]))  # running[j]: the sum over samples [0, start + j)
        end = start + len(x)
        for offset, sign in zip(offsets, (-1.0, 1.0), strict=True):
            # The steps whose edge falls in [start, end) (the last block: up to n, where windows are cut).
            last = steps if end == n else min(steps, (end - offset) // hop + 2)
            k = np.arange(max(0, (start - offset) // hop - 1), last)
            edge = np.clip(k * hop + offset, 0, n)
            inside = (edge >= start) & ((edge < end) | (end == n))
            power[k[inside]] += sign * running[edge[inside] - start]
        total, start = running[-1], end
    first = np.arange(steps) * hop
    width = np.clip(first + offsets[1], 0, n) - np.clip(first + offsets[0], 0, n)
    power /= np.maximum(width, 1)
    return np.maximum(10 * np.log10(power + 1e-30), SILENT_DB)


def analyse(audio: AudioInput | Samples, sample_rate: int = MODEL_SAMPLE_RATE) -> Activity:
    """Levels, local floor and quiet mask of mono float audio (values in [-1, 1]), or of a mono sound
    file at its own rate (read block by block)."""
    samples = Samples.of(audio, sample_rate)
    sample_rate = samples.sample_rate
    hop = max(1, round(HOP_S * sample_rate))
    level = levels_db(samples, hop, max(hop, round(WINDOW_S * sample_rate)))
    if len(level) == 0:
        empty = np.zeros(0)
        return Activity(empty, empty, np.zeros(0, dtype=bool), SILENT_DB, hop, sample_rate)
    block = max(1, round(FLOOR_BLOCK_S / HOP_S))
    n_blocks = -(-len(level) // block)
    block_floor = np.array([np.percentile(level[i * block : (i + 1) * block], FLOOR_PERCENTILE)
                            for i in range(n_blocks)])  # fmt: skip
    reach = max(1, round(FLOOR_REACH_S / FLOOR_BLOCK_S))
    local = np.array([block_floor[max(0, i - reach) : i + reach + 1].min() for i in range(n_blocks)])
    floor = np.repeat(local, block)[: len(level)]
    speech = float(np.percentile(level, 95))
    quiet = (level <= floor + QUIET_DB) & (level <= speech - MIN_DROP_DB)
    return Activity(level, floor, quiet, speech, hop, sample_rate)


REFINE_S = 0.1
"""Word edges move to a pause that starts or ends within this distance of the aligned edge."""
MIN_GAP_S = 0.02
"""A quiet stretch this long between two words is a pause between them."""
CLEAN_RANGE_DB = 40.0
"""A floor at least this far under the speech level is clean: any sound above it is the voice."""
FAR_REACH_S = 0.3
FAR_GAP_S = 0.08
"""Over a clean floor, a boundary with no quiet stretch of FAR_GAP_S within REFINE_S moves to the
nearest one within FAR_REACH_S: an acoustic model far from the voice's accent (espeak-ng's West
Midlands voice in a 12-minute talk) put boundaries 0.1-0.3 s inside the sound of one of the two
words. Stop closures in clean speech stay under FAR_GAP_S (65 ms measured); over noise or a music
bed quiet stretches that long occur inside words, so there the reach stays REFINE_S."""


def runs(mask: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """[start, end) of the True runs of ``mask`` at least ``min_len`` long."""
    m = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2], strict=True) if b - a >= min_len]


def snap_to_pauses(spans: list[tuple[float, float]], act: Activity) -> list[tuple[float, float]]:
    """Aligned (start, end) spans in seconds, in order, with their edges moved onto the audio's own pauses.

    Around each boundary between consecutive spans (and before the first, after the last) the
    quiet stretch of at least MIN_GAP_S that is longest and nearest (within REFINE_S of the
    aligned boundary) becomes the pause, as far as the audio stays quiet: the earlier span ends
    where it starts, the later one begins where it ends. A word's fading tail or soft onset is
    sound the energy detector hears where an acoustic model already hears silence, and a word
    forced over part of a long pause gives that part back. Without such a stretch the two spans
    touch at the quietest step between them. Over a clean floor, a boundary with no stretch of
    FAR_GAP_S near it takes the nearest such stretch within FAR_REACH_S. The result never overlaps.
    """
    hop, sr, total = act.hop, act.sample_rate, act.num_steps
    reach = max(1, round(REFINE_S * sr / hop))
    min_gap = max(1, round(MIN_GAP_S * sr / hop))
    far, far_gap = max(1, round(FAR_REACH_S * sr / hop)), max(1, round(FAR_GAP_S * sr / hop))
    edges = [[min(int(s * sr) // hop, total), min(-(-int(e * sr) // hop), total)] for s, e in spans]
    n = len(edges)
    for j in range(n + 1):
        left = edges[j - 1][1] if j > 0 else 0
        right = edges[j][0] if j < n else total
        a, b = min(left, right), max(left, right)
        lo = max(0, a - reach) if j > 0 else 0
        hi = min(total, b + reach) if j < n else total
        floor_lo = edges[j - 1][0] + 1 if j > 0 else 0  # a span keeps at least one step
        ceil_hi = edges[j][1] - 1 if j < n else total
        lo, hi = max(lo, floor_lo), min(hi, ceil_hi)
        if hi <= lo:
            continue
        found = [(lo + qa, lo + qb) for qa, qb in runs(act.quiet[lo:hi], min_gap)]
        if 0 < j < n and _clean(act, a) and not any(qb - qa >= far_gap for qa, qb in found):
            f_lo, f_hi = max(floor_lo, a - far), min(ceil_hi, b + far)
            longer = [(f_lo + qa, f_lo + qb) for qa, qb in runs(act.quiet[f_lo:f_hi], far_gap)] if f_hi > f_lo else []
            if longer:
                found = [min(longer, key=lambda run, a=a, b=b: max(0, run[0] - b, a - run[1]))]
        if found:

            def worth(run: tuple[int, int], a: int = a, b: int = b) -> float:
                away = max(0, run[0] - b, a - run[1])  # steps between the run and the aligned boundary
                return min(run[1] - run[0], 2 * reach) - away

            qa, qb = max(found, key=worth)
            loud = np.flatnonzero(~act.quiet[floor_lo:qa])
            qa = floor_lo + int(loud[-1]) + 1 if len(loud) else floor_lo
            loud = np.flatnonzero(~act.quiet[qb:ceil_hi])
            qb = qb + int(loud[0]) if len(loud) else ceil_hi
            # An edge moves inwards (the word gives quiet audio back) as far as the audio says, and
            # outwards (the word takes in sound the aligner left out) as far as the audio says only
            # over a clean floor: over a bed of music or noise that sound may be the bed's.
            grow = total if _clean(act, qa) else reach
            end = qa if qa <= left + grow else left
            start = qb if qb >= right - grow else right
            if j > 0:
                edges[j - 1][1] = min(end, start) if j < n else end
            if j < n:
                edges[j][0] = start
        elif 0 < j < n:
            cut = _onset(act, max(lo, a - min_gap), min(hi, b + reach))
            if cut is None:
                a, b = max(lo, a - min_gap), min(hi, b + min_gap)
                cut = a + int(np.argmin(act.level_db[a:b])) if b > a else a
            edges[j - 1][1] = edges[j][0] = cut
    end_s = total * hop / sr
    return [(min(s * hop / sr, end_s), min(max(e, s + 1) * hop / sr, end_s)) for s, e in edges]


def _clean(act: Activity, step: int) -> bool:
    """Whether the floor at ``step`` is clean (CLEAN_RANGE_DB under the speech level)."""
    return act.speech_db - act.floor_db[min(step, act.num_steps - 1)] >= CLEAN_RANGE_DB


ONSET_RISE_DB = 10.0
ONSET_VALLEY_DB = 25.0


def _onset(act: Activity, lo: int, hi: int) -> int | None:
    """The step where the next word's sound starts: the steepest rise in [lo, hi) out of a valley."""
    w = 2
    if hi - lo <= w:
        return None
    lvl = act.level_db
    rise = lvl[lo + w : hi] - lvl[lo : hi - w]
    k = int(np.argmax(rise))
    if rise[k] < ONSET_RISE_DB or lvl[lo + k] > act.speech_db - ONSET_VALLEY_DB:
        return None
    return lo + k + 1
