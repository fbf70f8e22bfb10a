"""Alignment accuracy and speed on speech with known word boundaries.

Speech is built word by word with espeak-ng (a test-fixture tool here, apt package
``espeak-ng``): each word is synthesized alone, its silence trimmed, and the words are
concatenated with random pauses, so every word's true start and end are known to the
sample. Several voices and speeds. For each aligner: median and 95th-percentile
absolute boundary error (starts and ends of the words it aligned), words it missed, and
the real-time factor (audio seconds per wall second, one process, one thread).
It also calibrates the fit score: the fit of each recording with its own script and
with another recording's script (a wrong file).

With ``--ctc-model FOLDER`` (a Wav2Vec2ForCTC folder) the CTC aligner (tasks/speech/ctc.py) is
measured too, and its fit calibrated the same way. No trained CTC model can be downloaded where
this was written, so its accuracy has not been measured; with a random-weight folder of the
real size only its real-time factor means anything.

Usage:
    .venv/bin/python bench/align_accuracy.py [--quick] [--json out.json] [--long-minutes 10]
        [--ctc-model FOLDER [--ctc-device cuda]]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.records import RowFailure  # noqa: E402
from tasks.speech.offline import FRAME_RATE, _model_paths, align_words, to_pcm16  # noqa: E402

SR = 16_000
SENTENCES = [
    "welcome to the quarterly product update for our sales and marketing teams",
    "in this short lesson you will learn how to set up your account and invite colleagues",
    "our new dashboard shows every campaign with its budget reach and conversion rate",
    "remember to review the safety checklist before you start working with the machine",
    "customers who joined last spring saved twenty percent on their first order",
    "the training videos are available in the learning portal from monday morning",
    "please contact the support desk if your password does not work after the reset",
    "thank you for watching and we look forward to seeing you at the next session",
]
VOICES = [("en-us", 175), ("en-us", 130), ("en-us", 220), ("en-gb", 160), ("en-gb-x-rp", 190), ("en-us", 160)]


def say(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
        capture_output=True,
        check=True,
    ).stdout
    x, rate = sf.read(io.BytesIO(wav), dtype="float32")
    x = resample_poly(x, SR, rate).astype(np.float32)
    idx = np.flatnonzero(np.abs(x) > 2e-3)
    return x[idx[0] : idx[-1] + 1] if len(idx) else x[:0]


def known_speech(
    words: list[str], voice: str, speed: int, rng: np.random.Generator, pitch: int = 50
) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """Words at known offsets: pauses of 0-250 ms, 400-700 ms after every 8th word, light noise."""
    cache: dict[str, np.ndarray] = {}
    parts = [np.zeros(int(rng.uniform(0.2, 0.6) * SR), np.float32)]
    pos = len(parts[0])
    truth = []
    for i, w in enumerate(words):
        a = cache.setdefault(w, say(w, voice, speed, pitch))
        truth.append((w, pos / SR, (pos + len(a)) / SR))
        parts.append(a)
        pos += len(a)
        gap = int((rng.uniform(0.4, 0.7) if i % 8 == 7 else rng.uniform(0.0, 0.25)) * SR)
        parts.append(np.zeros(gap, np.float32))
        pos += gap
    parts.append(np.zeros(int(0.4 * SR), np.float32))
    audio = np.concatenate(parts)
    audio += rng.normal(0, 3e-4, len(audio)).astype(np.float32)  # a noise floor, as in a real recording
    return audio, truth


def pocketsphinx_plain(audio: np.ndarray, script: str) -> list[tuple[str, float, float]]:
    """Baseline: pocketsphinx's own set_align_text with its default settings."""
    from pocketsphinx import Decoder

    hmm, _ = _model_paths()
    d = Decoder(hmm=hmm, lm=None, samprate=SR, loglevel="FATAL")
    d.set_align_text(script)
    d.start_utt()
    d.process_raw(to_pcm16(audio), full_utt=True)
    d.end_utt()
    if d.hyp() is None:
        return []
    return [
        (s.word.split("(")[0], s.start_frame / FRAME_RATE, (s.end_frame + 1) / FRAME_RATE)
        for s in d.seg()
        if not s.word.startswith(("<", "["))
    ]


def proportional(audio: np.ndarray, script: str) -> list[tuple[str, float, float]]:
    """Reference point without alignment: words spread over the audio by their length in letters."""
    words = script.split()
    dur = len(audio) / SR
    weights = np.array([len(w) + 1 for w in words], dtype=float)
    edges = np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum() * dur
    return [(w, edges[i], edges[i + 1]) for i, w in enumerate(words)]


def ours(audio: np.ndarray, script: str) -> list[tuple[str, float, float]]:
    analysis = align_words(audio, script)
    return [(w.word, w.start, w.end) for w in analysis.words if w.end > w.start]


ALIGNERS = {
    "offline (tasks.align)": ours,
    "pocketsphinx set_align_text": pocketsphinx_plain,
    "proportional (no alignment)": proportional,
}
CTC: dict = {}


def add_ctc(folder: Path, device: str) -> None:
    """Add the CTC aligner (tasks/speech/ctc.py) with the model in ``folder`` as a row; loading is not timed."""
    from tasks.speech.ctc import load_ctc_model

    CTC["aligner"] = load_ctc_model(folder, device)

    def ctc(audio: np.ndarray, script: str) -> list[tuple[str, float, float]]:
        analysis = CTC["aligner"].align(audio, script)
        return [(w.word, w.start, w.end) for w in analysis.words if w.end > w.start]

    ALIGNERS[f"ctc (tasks.align_ctc, {folder.name}, {device})"] = ctc


def errors(result: list[tuple[str, float, float]], truth: list[tuple[str, float, float]]) -> tuple[list[float], int]:
    """Absolute start and end errors of the words matched in order; count of truth words unmatched."""
    errs: list[float] = []
    j = 0
    matched = 0
    for w, s, e in result:
        while j < len(truth) and truth[j][0] != w:
            j += 1
        if j == len(truth):
            break
        errs += [abs(s - truth[j][1]), abs(e - truth[j][2])]
        matched += 1
        j += 1
    return errs, len(truth) - matched


def calibrate(pairs: list[tuple[np.ndarray, str]], aligner: Callable = align_words) -> dict:
    """Fit and flags of each recording with its own script and with the next recording's (a wrong file)."""
    own, wrong = [], []
    for i, (audio, text) in enumerate(pairs):
        own.append(describe(audio, text, aligner))
        wrong.append(describe(audio, pairs[(i + 1) % len(pairs)][1], aligner))
    return {"own": own, "wrong": wrong}


def describe(audio: np.ndarray, text: str, aligner: Callable = align_words) -> str:
    try:
        a = aligner(audio, text)
    except RowFailure:
        return "no alignment (RowFailure)"
    mismatch = any(f.startswith("audio_script_mismatch") for f in a.flags)
    missing = sum(1 for w in a.words if w.score == 0.0 and w.start == w.end)
    return f"fit {a.fit_score:.2f}, {missing}/{len(a.words)} not found" + (", MISMATCH" if mismatch else "")


def librivox(folder: Path) -> dict:
    """Human speech: agreement with the reference alignments shipped beside the clips, and the fit."""
    pairs, errs = [], []
    audio_s = wall = 0.0
    for wav in sorted(folder.glob("*.wav")):
        audio, rate = sf.read(wav, dtype="float32")
        text = wav.with_suffix(".txt").read_text().strip()
        ref = [w for w in json.loads(wav.with_suffix(".json").read_text())["w"] if not w["t"].startswith("<")]
        t0 = time.perf_counter()
        a = align_words(audio, text)
        wall += time.perf_counter() - t0
        audio_s += len(audio) / rate
        for w, r in zip(a.words, ref, strict=False):
            errs += [abs(w.start - r["b"]), abs(w.end - (r["b"] + r["d"]))]
        pairs.append((audio, text))
    arr = np.array(errs)
    return {
        "clips": len(pairs),
        "audio_s": round(audio_s, 1),
        "rtf": round(audio_s / wall, 1),
        "agreement_median_ms": round(float(np.median(arr)) * 1000, 1),
        "agreement_p95_ms": round(float(np.percentile(arr, 95)) * 1000, 1),
        "fit": calibrate(pairs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two voices only")
    ap.add_argument("--long-minutes", type=float, default=10.0, help="length of the long-file speed test (0: skip)")
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--ctc-model", type=Path, help="also measure the CTC aligner with this Wav2Vec2ForCTC folder")
    ap.add_argument("--ctc-device", default="cpu", help="torch device for the CTC model")
    ap.add_argument(
        "--librivox",
        type=Path,
        help="folder of LibriVox clips with .txt scripts and .json reference "
        "alignments, as in pocketsphinx's source distribution (test/data/librivox)",
    )
    args = ap.parse_args()
    if args.ctc_model:
        add_ctc(args.ctc_model, args.ctc_device)
    rng = np.random.default_rng(0)
    voices = VOICES[:2] if args.quick else VOICES
    cases = []
    for k, (voice, speed) in enumerate(voices):
        # Two sentences per case, a different pair per voice.
        text = f"{SENTENCES[k % 8]} {SENTENCES[(k + 3) % 8]}"
        audio, truth = known_speech(text.split(), voice, speed, rng, pitch=40 + 10 * (k % 3))
        cases.append((f"{voice}@{speed}", text, audio, truth))

    results = {}
    for name, fn in ALIGNERS.items():
        all_errs: list[float] = []
        missed = 0
        audio_s = wall = 0.0
        for _, text, audio, truth in cases:
            t0 = time.perf_counter()
            out = fn(audio, text)
            wall += time.perf_counter() - t0
            audio_s += len(audio) / SR
            e, m = errors(out, truth)
            all_errs += e
            missed += m
        arr = np.array(all_errs)
        results[name] = {
            "median_ms": round(float(np.median(arr)) * 1000, 1),
            "p95_ms": round(float(np.percentile(arr, 95)) * 1000, 1),
            "max_ms": round(float(arr.max()) * 1000, 1),
            "boundaries": len(arr),
            "missed_words": missed,
            "rtf": round(audio_s / wall, 1),
            "audio_s": round(audio_s, 1),
        }
        print(name, results[name], flush=True)

    results["fit_espeak"] = calibrate([(c[2], c[1]) for c in cases])
    print("fit (espeak-ng)", results["fit_espeak"], flush=True)
    if args.ctc_model:
        results["fit_espeak_ctc"] = calibrate([(c[2], c[1]) for c in cases], CTC["aligner"].align)
        print("fit (espeak-ng, CTC)", results["fit_espeak_ctc"], flush=True)
    if args.librivox:
        results["librivox"] = librivox(args.librivox)
        print("librivox", results["librivox"], flush=True)

    if args.long_minutes > 0:
        # A long file: the cases repeated up to the length, aligned in one call.
        reps = int(np.ceil(args.long_minutes * 60 / sum(len(c[2]) / SR for c in cases)))
        audio = np.concatenate([c[2] for c in cases] * reps)[: int(args.long_minutes * 60 * SR)]
        total = 0
        texts = []
        truth: list[tuple[str, float, float]] = []
        for c in cases * reps:
            if total + len(c[2]) > len(audio):
                break
            texts.append(c[1])
            truth += [(w, s + total / SR, e + total / SR) for w, s, e in c[3]]
            total += len(c[2])
        audio = audio[:total]
        t0 = time.perf_counter()
        analysis = align_words(audio, " ".join(texts))
        wall = time.perf_counter() - t0
        errs, missed = errors([(w.word, w.start, w.end) for w in analysis.words if w.end > w.start], truth)
        results["long_file"] = {
            "median_ms": round(float(np.median(errs)) * 1000, 1),
            "p95_ms": round(float(np.percentile(errs, 95)) * 1000, 1),
            "missed_words": missed,
            "audio_s": round(total / SR, 1),
            "wall_s": round(wall, 2),
            "rtf": round(total / SR / wall, 1),
            "fit": analysis.fit_score,
            "flags": analysis.flags,
        }
        print("long file", results["long_file"], flush=True)

    results["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cores_visible": os.cpu_count(),
        "cases": [c[0] for c in cases],
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
