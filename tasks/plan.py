"""Chunk planning: split a row's audio into independently generated segments.

Wan2.2-S2V renders a segment clip by clip, each clip continuing from the previous
clip's last 73 frames, so a segment's quality drifts with its length and a failure
late in a long segment is expensive. Long audio is therefore cut into segments of at
most ``max_segment_s`` that are generated independently from the reference image and
concatenated afterwards. A cut is a visible seam, so it must fall in a pause between
words, never inside one.

Rules (all in integer samples of the 16 kHz model audio, so segments tile the audio
exactly, without gap or overlap):

* A word occupies samples ``[round(start * sr), round(end * sr))``; a cut at sample
  ``c`` is between words when no word has ``word_start < c < word_end`` (rounding to the
  nearest sample, so words that touch in seconds touch in samples). Touching words
  leave a zero-length pause between them. Words the aligner did not find take no room.
* With the row's audio (``audio``), a cut is *safe* only where the audio itself is quiet
  AND between aligned words: inside a quiet run of at least ``activity.MIN_QUIET_S``
  (``tasks/speech/activity.py``), ``QUIET_GUARD_S`` from its edges, and ``WORD_GUARD_S``
  from the nearest aligned word. A wrong alignment then cannot put a cut inside a word:
  words are not quiet for that long. Without the audio every pause between words counts.
* Audio no longer than ``max_segment_s`` is one segment. Longer audio is cut greedily:
  the next cut lies in ``[pos + min, min(pos + max, end - min)]`` and aims at the
  balanced target ``pos + remaining / ceil(remaining / max)``; among the safe stretches in
  that window it takes the best of ``min(length_s, PAUSE_CAP_S) - DISTANCE_PENALTY *
  |cut - target|_s`` (prefer the longest pause near the target), cutting at the
  stretch's centre, on a video-frame boundary, where the window allows.
* When no safe cut exists in the window, the row says so (an ``unsafe_cut`` flag naming the
  window and the point) and the cut goes to the least harmful point of the window: the
  quietest, relative to the audio's floor, with UNSAFE_INSIDE_WORD_DB against points inside
  an aligned word. Without the audio, should a word (or a run of touching words) span the
  whole window, the cut moves to the first point between words after it (a ``long_segment``
  flag): a segment longer than the maximum beats a cut word.
  No segment is shorter than ``min_segment_s`` unless the audio is.
* Without word timings (``words=None``) the plan is marked approximate and the cut
  goes to the quietest stretch of the audio's (or an ``energy`` envelope's) level near the
  target, or exactly to the target when neither is given.

``frames = ceil(duration_s * fps)`` and ``clips = ceil(frames / infer_frames)``; the
surplus frames of a segment's last clip are trimmed at stitching.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.cost import CostModel
from tasks.records import FPS, INFER_FRAMES, MODEL_SAMPLE_RATE, Plan, Resolution, Segment, SpeechAnalysis, WordTiming
from tasks.speech.activity import MIN_QUIET_S, Activity, analyse
from tasks.speech.samples import BLOCK, AudioInput, Samples

PAUSE_CAP_S = 1.5
"""Pauses longer than this are no better a cut than this (a sentence break is enough)."""
DISTANCE_PENALTY = 0.05
"""Seconds of pause a cut gives up per second it lies away from the target."""
ENERGY_HOP_S = 0.01
"""Hop of the energy envelope taken by the no-alignment path (10 ms)."""
ENERGY_SMOOTH_S = 0.2
"""The envelope is averaged over this span so a quiet instant inside a word cannot win."""
QUIET_GUARD_S = 0.05
"""A safe cut keeps this far inside its quiet run ..."""
WORD_GUARD_S = 0.03
"""... and this far from the nearest aligned word."""
UNSAFE_INSIDE_WORD_DB = 20.0
"""Ranking the points of a window without a safe cut: a point inside an aligned word counts as
this much louder (a point between words, even a loud one, is more likely a word boundary)."""
UNSAFE_DISTANCE_DB = 0.5
"""... and each second from the balanced target as this much louder."""


# --------------------------------------------------------------------------- seeds


def segment_seed(row_seed: int, index: int) -> int:
    """Seed of segment ``index`` of a row.

    Segment 0 keeps the row's seed, so a row that fits one segment renders exactly as
    the reference implementation would with that seed. Later segments take
    ``int.from_bytes(blake2b(f"s2v-batch/segment/{row_seed}/{index}", digest_size=8)) % 2**31``:
    stable across Python runs and machines (unlike ``hash()``), and far from
    ``row_seed + k``, which the model already uses for clip k inside a segment.
    """
    if index == 0:
        return row_seed
    digest = hashlib.blake2b(f"s2v-batch/segment/{row_seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 2**31


# --------------------------------------------------------------------------- energy


def frame_energy(
    audio: AudioInput | Samples, *, sample_rate: int = MODEL_SAMPLE_RATE, hop_s: float = ENERGY_HOP_S
) -> np.ndarray:
    """Mean-square energy of the audio (an array, or a mono file at its own rate, read a block at a time)
    in consecutive windows of ``hop_s`` (10 ms by default).

    The last window may be shorter. This is the ``energy`` argument of ``plan_row``.
    """
    samples = Samples.of(audio, sample_rate)
    hop = max(1, round(hop_s * samples.sample_rate))
    n = math.ceil(samples.num_samples / hop)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    sq = np.zeros(n, dtype=np.float32)  # a file that reads short leaves silence, not stale memory
    done = 0
    for block in samples.blocks(max(1, BLOCK // hop) * hop):  # whole windows per block
        x = np.asarray(block, dtype=np.float32)
        count = math.ceil(len(x) / hop)
        padded = np.zeros(count * hop, dtype=np.float32)
        padded[: len(x)] = x
        sq[done : done + count] = (padded.reshape(count, hop) ** 2).sum(axis=1)
        done += count
    counts = np.full(n, hop, dtype=np.float32)
    counts[-1] = samples.num_samples - (n - 1) * hop
    return sq / counts


# --------------------------------------------------------------------------- planner


def _validate(
    num_samples: int,
    sample_rate: int,
    fps: int,
    infer_frames: int,
    max_s: float,
    min_s: float,
    width: int,
    height: int,
    steps: int,
) -> None:
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if sample_rate <= 0 or fps <= 0:
        raise ValueError(f"sample_rate and fps must be positive, got {sample_rate} and {fps}")
    if infer_frames <= 0 or infer_frames % 4:
        raise ValueError(f"infer_frames must be a positive multiple of 4, got {infer_frames}")
    if not max_s > 0:
        raise ValueError(f"max_segment_s must be positive, got {max_s}")
    if not 0 <= min_s <= max_s / 2:
        # With min > max / 2, audio of 1.5 × max could not be cut into valid segments.
        raise ValueError(f"min_segment_s must be between 0 and max_segment_s / 2, got {min_s} (max {max_s})")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}×{height}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")


def _matching(audio: AudioInput | Samples, num_samples: int, sample_rate: int) -> Samples:
    """``audio`` as Samples; ValueError when its rate or length is not the one the cuts are computed for."""
    samples = Samples.of(audio, sample_rate)
    if (samples.num_samples, samples.sample_rate) != (num_samples, sample_rate):
        what = samples.source.name if isinstance(samples.source, Path) else "the audio"
        raise ValueError(f"{what} has {samples.num_samples} samples at {samples.sample_rate} Hz; the plan is for "
                         f"{num_samples} samples at {sample_rate} Hz")
    return samples


def _pauses(words: Sequence[WordTiming], num_samples: int, sample_rate: int) -> tuple[list[int], list[int]]:
    """Sample intervals [lo, hi] between words (inclusive bounds: valid cut points).

    Overlapping word intervals (aligners do emit them) are merged; touching words leave
    a zero-length pause.
    """
    spans = []
    for w in words:
        if not w.found:
            continue
        s = min(max(round(w.start * sample_rate), 0), num_samples)
        e = min(max(round(w.end * sample_rate), 0), num_samples)
        if e < s:
            s, e = e, s
        spans.append((s, e))
    spans.sort()
    lo_list: list[int] = []
    hi_list: list[int] = []
    cursor = 0
    for s, e in spans:
        if s >= cursor:
            lo_list.append(cursor)
            hi_list.append(s)
        cursor = max(cursor, e)
    lo_list.append(cursor)
    hi_list.append(num_samples)
    return lo_list, hi_list


def _snap(cut: int, a: int, b: int, step: int) -> int:
    """The multiple of `step` (a video frame, in samples) nearest `cut` within [a, b]; `cut` if none.

    Segments that start and end on frame boundaries hold a whole number of frames, so each
    segment's video is exactly as long as its audio and sync does not drift segment by segment.
    """
    if step <= 1:
        return cut
    nearest = round(cut / step) * step
    for candidate in (nearest, nearest - step, nearest + step):
        if a <= candidate <= b:
            return candidate
    return cut


def _cut_from_words(
    pos: int,
    lo: int,
    hi: int,
    target: int,
    pause_lo: list[int],
    pause_hi: list[int],
    sample_rate: int,
    num_samples: int,
    min_len: int,
    step: int = 1,
) -> int | None:
    """Best valid cut in [lo, hi]; the first valid cut after hi when none; None when none at all."""
    # Pauses are sorted and disjoint: those that reach into [lo, hi] are a contiguous run.
    first = bisect.bisect_left(pause_hi, lo)
    best: tuple[bool, float, int] | None = None
    for k in range(first, len(pause_lo)):
        p_lo, p_hi = pause_lo[k], pause_hi[k]
        if p_lo > hi:
            break
        a, b = max(p_lo, lo), min(p_hi, hi)
        if a > b:
            continue
        centre = (p_lo + p_hi) // 2
        cut = _snap(min(max(centre, a), b), a, b, step)
        score = min((p_hi - p_lo) / sample_rate, PAUSE_CAP_S) - DISTANCE_PENALTY * abs(cut - target) / sample_rate
        # A cut on a frame boundary beats any other (a pause's part inside the window may hold none).
        key = (cut % step == 0, score, cut)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is not None:
        return best[2]
    # A word spans the whole window: cut at the first pause after it, if that leaves
    # a final segment of at least the minimum.
    for k in range(first, len(pause_lo)):
        if pause_lo[k] > hi and pause_lo[k] <= num_samples - min_len:
            return _snap(pause_lo[k], pause_lo[k], min(pause_hi[k], num_samples - min_len), step)
    return None


def _smoothed_db(energy: np.ndarray) -> np.ndarray:
    """Energy envelope averaged over ENERGY_SMOOTH_S, in dB."""
    smooth = max(1, round(ENERGY_SMOOTH_S / ENERGY_HOP_S))
    avg = np.convolve(np.asarray(energy, dtype=np.float64), np.ones(smooth) / smooth, mode="same")
    return 10 * np.log10(avg + 1e-10)


def _cut_from_energy(lo: int, hi: int, target: int, db: np.ndarray | None, sample_rate: int) -> int:
    """Quietest point near the target in [lo, hi] (the target itself without an envelope)."""
    if db is None or len(db) == 0:
        return target
    hop = round(ENERGY_HOP_S * sample_rate)
    i0, i1 = lo // hop, min(hi // hop, len(db) - 1)
    if i0 > i1:
        return target
    centre = np.arange(i0, i1 + 1) * hop + hop // 2
    # 1 dB of quiet is worth 0.5 s of distance from the target.
    score = db[i0 : i1 + 1] + 2.0 * np.abs(centre - target) / sample_rate
    best = int(np.argmin(score))
    return int(min(max(centre[best], lo), hi))


def _safe_stretches(
    pauses: tuple[list[int], list[int]], act: Activity, num_samples: int, step: int
) -> tuple[list[int], list[int]]:
    """Sample intervals [lo, hi] where a cut is safe: inside a quiet run of the audio (QUIET_GUARD_S in)
    and between aligned words (WORD_GUARD_S away), holding a video-frame boundary."""
    sr = act.sample_rate
    q_lo, q_hi = act.quiet_runs(MIN_QUIET_S)
    qg, wg = round(QUIET_GUARD_S * sr), round(WORD_GUARD_S * sr)
    p_lo, p_hi = pauses
    out_lo: list[int] = []
    out_hi: list[int] = []
    i = j = 0
    while i < len(p_lo) and j < len(q_lo):
        a = max(p_lo[i] + (wg if p_lo[i] > 0 else 0), int(q_lo[j]) + qg)
        b = min(p_hi[i] - (wg if p_hi[i] < num_samples else 0), min(int(q_hi[j]), num_samples) - qg)
        if a <= b and (step <= 1 or (b // step) * step >= a):
            out_lo.append(a)
            out_hi.append(b)
        if p_hi[i] < q_hi[j]:
            i += 1
        else:
            j += 1
    return out_lo, out_hi


def _loudness(act: Activity) -> np.ndarray:
    """dB above the local floor of each activity step, the loudest within ±25 ms (a cut's neighbourhood)."""
    rel = act.level_db - act.floor_db
    half = max(1, round(0.025 * act.sample_rate / act.hop))
    padded = np.pad(rel, half, mode="edge")
    return np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1).max(axis=1)


def _least_harmful(
    lo: int, hi: int, target: int, pauses: tuple[list[int], list[int]] | None, words: list[WordTiming],
    act: Activity, loud: np.ndarray, step: int,
) -> tuple[int, str]:
    """The least harmful cut in [lo, hi] when no safe one exists, and what it is (for the flag)."""
    sr = act.sample_rate
    grid = np.arange(-(-lo // step) * step, hi + 1, step) if step > 1 else np.arange(lo, hi + 1, act.hop)
    if len(grid) == 0:
        grid = np.array([target])
    harm = loud[np.clip(grid // act.hop, 0, len(loud) - 1)] + UNSAFE_DISTANCE_DB * np.abs(grid - target) / sr
    if pauses is not None:
        p_lo, p_hi = pauses
        k = np.searchsorted(np.asarray(p_lo), grid, side="right") - 1
        between = (k >= 0) & (grid <= np.asarray(p_hi)[np.maximum(k, 0)])
        harm = harm + UNSAFE_INSIDE_WORD_DB * ~between
    cut = int(grid[int(np.argmin(harm))])
    level = f"{loud[min(cut // act.hop, len(loud) - 1)]:.0f} dB above the quiet level"
    if not words:
        return cut, f"the quietest point, {level}"
    starts = [w.start for w in words]
    i = bisect.bisect_right(starts, cut / sr) - 1
    if i >= 0 and words[i].end * sr > cut:
        return cut, f"inside '{words[i].word}' as aligned ({words[i].start:.2f}-{words[i].end:.2f} s), {level}"
    before = f"'{words[i].word}'" if i >= 0 else "the start"
    after = f"'{words[i + 1].word}'" if i + 1 < len(words) else "the end"
    return cut, f"between {before} and {after}, {level}"


def plan_row(
    row_id: str,
    num_samples: int,
    words: list[WordTiming] | None,
    *,
    seed: int,
    width: int,
    height: int,
    sample_rate: int = MODEL_SAMPLE_RATE,
    fps: int = FPS,
    infer_frames: int = INFER_FRAMES,
    max_segment_s: float = 60.0,
    min_segment_s: float = 10.0,
    cost: CostModel | None = None,
    resolution: Resolution = Resolution.P480,
    steps: int = 40,
    guidance: float = 4.5,
    energy: np.ndarray | None = None,
    audio: AudioInput | Samples | None = None,
    speech: SpeechAnalysis | None = None,
) -> Plan:
    """Plan one row's segments (see the module docstring for the rules).

    ``words``: word timings in seconds from an alignment, or None when there is none
    (the plan is then approximate). ``audio``: the row's mono audio at ``sample_rate``, or its mono
    file (read a block at a time); cuts are then verified against it (only quiet points between
    words are safe). ``energy``: optional envelope from ``frame_energy``, used only without words or
    audio. ``speech``: the row's alignment, whose fit score and flags the plan carries as evidence. Raises ValueError on
    invalid parameters, and on audio whose rate or length is not ``sample_rate`` or ``num_samples``.
    """
    _validate(num_samples, sample_rate, fps, infer_frames, max_segment_s, min_segment_s, width, height, steps)
    samples = _matching(audio, num_samples, sample_rate) if audio is not None else None
    cost = cost if cost is not None else CostModel()
    max_len = max(1, math.floor(max_segment_s * sample_rate))
    min_len = math.ceil(min_segment_s * sample_rate)
    words = [w for w in words if w.found] if words is not None else None
    pauses = _pauses(words, num_samples, sample_rate) if words else None
    step = sample_rate // fps if sample_rate % fps == 0 else 1  # samples per video frame
    cut_more = num_samples > max_len
    act = analyse(samples) if samples is not None and cut_more else None
    if act is not None and energy is None:
        energy = frame_energy(samples)
    db = _smoothed_db(energy) if pauses is None and energy is not None and cut_more else None
    safe = _safe_stretches(pauses, act, num_samples, step) if act is not None and pauses is not None else pauses
    loud = _loudness(act) if act is not None else None

    flags: list[str] = []
    if words is None and cut_more:
        flags.append("approximate_cuts: no trusted word timings; cuts at the quietest points of the audio"
                     if energy is not None else "approximate_cuts: no word timings and no audio; cuts at the targets")
    cuts = [0]
    pos = 0
    while num_samples - pos > max_len:
        remaining = num_samples - pos
        lo = pos + max(min_len, step, 1)  # a segment holds at least one video frame
        hi = min(pos + max_len, num_samples - max(min_len, 1))
        target = pos + remaining // math.ceil(remaining / max_len)
        target = min(max(target, lo), hi)
        window = f"{lo / sample_rate:.1f}-{hi / sample_rate:.1f} s"
        if safe is not None:
            in_window = act is None or _first_in(safe, lo, hi)
            cut = _cut_from_words(pos, lo, hi, target, *safe, sample_rate, num_samples, max(min_len, 1), step)
            if act is not None and not in_window:
                cut, what = _least_harmful(lo, hi, target, pauses, words or [], act, loud, step)
                flags.append(f"unsafe_cut: no quiet pause between aligned words in {window}; "
                             f"cut at {cut / sample_rate:.2f} s, {what}")  # fmt: skip
            elif cut is None:  # one word (or touching words) runs to the end: no valid cut left
                flags.append(f"long_segment: no pause between words from {lo / sample_rate:.1f} s to the end; "
                             f"segment {len(cuts)} runs over {max_segment_s:g} s")  # fmt: skip
                break
            elif cut > hi:
                flags.append(f"long_segment: no pause between words in {window}; segment {len(cuts)} runs to "
                             f"{cut / sample_rate:.1f} s, over {max_segment_s:g} s")  # fmt: skip
        else:
            cut = _snap(_cut_from_energy(lo, hi, target, db, sample_rate), lo, hi, step)
            if act is not None and not _is_safe(cut, act):
                _, what = _least_harmful(cut, cut, cut, None, [], act, loud, 1)
                flags.append(f"unsafe_cut: no quiet pause in {window}; cut at {cut / sample_rate:.2f} s, {what}")
        cuts.append(cut)
        pos = cut
    cuts.append(num_samples)

    segments = []
    for index, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        frames = -(-(b - a) * fps // sample_rate)  # ceil in integers: no float drift
        clips = -(-frames // infer_frames)
        segments.append(
            Segment(
                index=index,
                start_sample=a,
                end_sample=b,
                start_s=a / sample_rate,
                end_s=b / sample_rate,
                frames=frames,
                clips=clips,
                seed=segment_seed(seed, index),
                est_gpu_s=cost.estimate(clips, resolution=resolution, steps=steps, guidance=guidance),
            )
        )
    return Plan(
        row_id=row_id,
        fps=fps,
        infer_frames=infer_frames,
        sample_rate=sample_rate,
        width=width,
        height=height,
        segments=segments,
        approximate=words is None,
        fit_score=speech.fit_score if speech is not None else None,
        flags=(list(speech.flags) if speech is not None else []) + flags,
    )


def _first_in(stretches: tuple[list[int], list[int]], lo: int, hi: int) -> bool:
    """Whether any of the sorted, disjoint stretches reaches into [lo, hi]."""
    k = bisect.bisect_left(stretches[1], lo)
    return k < len(stretches[0]) and stretches[0][k] <= hi


def _is_safe(cut: int, act: Activity) -> bool:
    """Whether ``cut`` lies QUIET_GUARD_S inside a quiet run of at least MIN_QUIET_S."""
    q_lo, q_hi = act.quiet_runs(MIN_QUIET_S)
    guard = round(QUIET_GUARD_S * act.sample_rate)
    k = int(np.searchsorted(q_lo, cut, side="right")) - 1
    return k >= 0 and q_lo[k] + guard <= cut <= q_hi[k] - guard
