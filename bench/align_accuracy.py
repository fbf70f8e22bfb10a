"""Word-boundary accuracy and speed of the aligners, per condition, on a corpus this script builds.

Every condition is speech whose word boundaries are known to the sample: each word is said
alone, trimmed where it becomes audible (|x| > 2e-3) and the words are joined with pauses, so
a word's true start and end are where its samples begin and end.

* **espeak-ng** (Debian package ``espeak-ng``): male and female voices and variants, English
  accents of several regions (US, RP, Scotland, West Midlands, Caribbean, New York), speeds
  from 110 to 320 words a minute, pitch from 10 to 95, long pauses (1-2 s) and none, and the
  same speech under pink noise at 20 and 10 dB SNR and under a music bed (chords, bass and
  drums) at 15 and 10 dB. TTS output keeps its digital silence between words.
* **human**: the prompts Allison Smith recorded for Asterisk (Debian package
  ``asterisk-core-sounds-en-wav``, CC BY-SA 3.0, 8 kHz telephone band; fetched with
  ``apt-get download`` into the cache folder, never shipped): single-word prompts joined into
  sentences (word truth), and whole multi-word prompts joined (continuous human speech: truth
  for the first and last word of each prompt only; every word is checked for being found).
* **LibriVox** (public domain; ``test/data/librivox`` of the pocketsphinx source distribution,
  fetched with ``pip download``): continuous read speech. Its reference alignments were made by
  pocketsphinx itself, so only "no word dropped" and agreement are reported, not accuracy.

Per condition: median, 95th percentile and max of |aligned - true| over word starts and ends,
words not found (dropped) and zero-length words, and the real-time factor per core (audio
seconds per CPU second of this process, one thread; wall-clock too). "Intelligible" conditions
are the ones the targets apply to (all but the foreign-voice stress case).

Then: a 12-minute synthetic talk aligned in one call and planned as the pipeline plans it (cuts
checked against the true word spans), and the fit calibration (each condition with its own
script and with another one's: the ``audio_script_mismatch`` flag).

With ``--ctc-model FOLDER`` the CTC aligner (tasks/speech/ctc.py) runs on the same corpus; with
``--ctc-random-large`` on a random Wav2Vec2ForCTC of the real size (wav2vec2-large, 315 M
parameters): no trained CTC model can be downloaded where this was written, so its accuracy
figures mean nothing and only its speed counts.

Usage:
    .venv/bin/python bench/align_accuracy.py [--quick] [--no-human] [--long-minutes 12]
        [--ctc-model FOLDER | --ctc-random-large] [--ctc-device cuda] [--json out.json] [--cache DIR]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.plan import plan_row  # noqa: E402
from tasks.records import RowFailure, SpeechAnalysis  # noqa: E402
from tasks.speech import offline, search  # noqa: E402
from tasks.speech.offline import align_words  # noqa: E402
from tasks.speech.script import normalize_script  # noqa: E402

SR = 16_000
AUDIBLE = 2e-3
SENTENCES = [
    "welcome to the quarterly product update for our sales and marketing teams",
    "in this short lesson you will learn how to set up your account and invite colleagues",
    "our new dashboard shows every campaign with its budget reach and conversion rate",
    "remember to review the safety checklist before you start working with the machine",
    "customers who joined last spring saved twenty percent on their first order",
    "the training videos are available in the learning portal from monday morning",
    "please contact the support desk if your password does not work after the reset",
    "thank you for watching and we look forward to seeing you at the next session",
    "each module ends with a quiz so you can check what you have learned",
    "our smartwatch tracks your sleep your heart rate and your daily steps",
    "the onboarding checklist helps new hires find their way in the first week",
    "questions about invoices go to the finance team at the regional office",
]


@dataclass
class Case:
    name: str
    text: str
    audio: np.ndarray
    truth: list[tuple[str, float, float]]
    """(word, start, end) of each script word with known edges (all words, or the edges of phrases)."""
    group: str = "espeak-ng"
    intelligible: bool = True
    edges_only: bool = False
    """Truth is known at the first and last word of each phrase only (continuous human speech)."""
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- building blocks


def trim(x: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(np.abs(x) > AUDIBLE)
    return x[idx[0] : idx[-1] + 1] if len(idx) else x[:0]


@functools.cache
def espeak_word(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    x, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return trim(resample_poly(x, SR, rate).astype(np.float32))


def join(
    pieces: list[tuple[str, np.ndarray]], gaps: Callable[[int], float], lead: float = 0.4
) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """Pieces in order with ``gaps(i)`` seconds after piece i; the audio and (text, start, end) of each."""
    parts, truth, pos = [np.zeros(int(lead * SR), np.float32)], [], int(lead * SR)
    for i, (text, a) in enumerate(pieces):
        truth.append((text, pos / SR, (pos + len(a)) / SR))
        gap = int(gaps(i) * SR)
        parts += [a, np.zeros(gap, np.float32)]
        pos += len(a) + gap
    parts.append(np.zeros(int(0.4 * SR), np.float32))
    return np.concatenate(parts), truth


def pause_pattern(
    kind: str, rng: np.random.Generator, words: list[str], ends: set[int] | None = None
) -> Callable[[int], float]:
    """Seconds after word i: normal (0-250 ms, 400-800 ms at a sentence end), long (1-2 s every 5th), none.

    ``ends``: the indices of the words that end a sentence (by default those of SENTENCES said once in order).
    """
    ends = set(np.cumsum([len(s.split()) for s in SENTENCES]) - 1) if ends is None else ends
    draws = rng.uniform(0, 1, len(words))
    if kind == "none":
        return lambda i: 0.0
    if kind == "long":
        return lambda i: 1.0 + draws[i] if i % 5 == 4 else 0.25 * draws[i]
    return lambda i: 0.4 + 0.4 * draws[i] if i in ends else 0.25 * draws[i]


def speech_level(audio: np.ndarray) -> float:
    return float(np.mean(np.square(audio[np.abs(audio) > AUDIBLE], dtype=np.float64)))


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.normal(0, 1, n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spectrum[1:] /= np.sqrt(f[1:] / f[1])
    spectrum[0] = 0
    return np.fft.irfft(spectrum, n)


def music_bed(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two bars a second of chords with harmonics, a bass note and a drum hit per beat, slowly swelling."""
    t = np.arange(n) / SR
    out = np.zeros(n)
    chords = [(261.6, 329.6, 392.0), (220.0, 261.6, 329.6), (174.6, 220.0, 261.6), (196.0, 246.9, 293.7)]
    beat = int(0.5 * SR)
    for k in range(0, n, beat):
        sl = slice(k, min(n, k + beat))
        tt = t[sl] - t[k]
        chord = chords[(k // beat // 4) % 4]
        env = np.exp(-tt * 1.5)
        for f in chord:
            for h in (1, 2, 3):
                out[sl] += 0.2 / h * env * np.sin(2 * np.pi * f * h * t[sl])
        out[sl] += 0.5 * env * np.sin(2 * np.pi * chord[0] / 2 * t[sl])
        hit = min(len(tt), int(0.06 * SR))
        out[k : k + hit] += rng.normal(0, 0.6, hit) * np.exp(-np.arange(hit) / (0.015 * SR))
    return out * (1 + 0.3 * np.sin(2 * np.pi * t / 7))


def mix(audio: np.ndarray, bed: np.ndarray, snr_db: float) -> np.ndarray:
    bed = bed * np.sqrt(speech_level(audio) / 10 ** (snr_db / 10) / np.mean(bed**2))
    return (audio + bed).astype(np.float32)


# --------------------------------------------------------------------------- the corpus

# (name, voice, words a minute, pitch, pauses, intelligible)
ESPEAK = [
    ("en-us male", "en-us", 175, 50, "normal"),
    ("en-us female (f3)", "en-us+f3", 175, 55, "normal"),
    ("en-gb female (f2), pitch 80", "en-gb+f2", 165, 80, "normal"),
    ("en-gb-x-rp male (m3), pitch 30", "en-gb-x-rp+m3", 185, 30, "normal"),
    ("en-gb-scotland", "en-gb-scotland", 170, 50, "normal"),
    ("en-gb-x-gbcwmd (West Midlands) female (f4)", "en-gb-x-gbcwmd+f4", 170, 60, "normal"),
    ("en-029 (Caribbean)", "en-029", 160, 50, "normal"),
    ("en-us-nyc", "en-us-nyc", 180, 45, "normal"),
    ("en-us klatt voice", "en-us+klatt", 170, 50, "normal"),
    ("slow, 110 wpm", "en-us", 110, 50, "normal"),
    ("fast, 260 wpm (f5)", "en-us+f5", 260, 60, "normal"),
    ("very fast, 320 wpm", "en-gb", 320, 50, "normal"),
    ("low pitch 10 (m7)", "en-us+m7", 170, 10, "normal"),
    ("high pitch 95 (f1)", "en-us+f1", 170, 95, "normal"),
    ("long pauses (1-2 s)", "en-gb", 165, 50, "long"),
    ("no pauses", "en-us", 175, 50, "none"),
    ("no pauses, fast female", "en-us+f3", 240, 60, "none"),
]
DEGRADED = [
    ("pink noise 20 dB SNR", "noise", 20),
    ("pink noise 10 dB SNR", "noise", 10),
    ("music bed 15 dB under the voice", "music", 15),
    ("music bed 10 dB under the voice", "music", 10),
]
STRESS = [("stress: German voice reading English", "de", 160, 50, "normal")]
"""Reported but outside the targets: espeak-ng's German rules say English words the German way."""


def espeak_cases(rng: np.random.Generator, quick: bool) -> list[Case]:
    cases = []
    chosen = ESPEAK[:3] + ESPEAK[15:16] if quick else ESPEAK
    for k, (name, voice, speed, pitch, pauses) in enumerate(chosen + ([] if quick else STRESS)):
        text = " ".join(SENTENCES[(3 * k + i) % len(SENTENCES)] for i in range(3))
        words = text.split()
        audio, truth = join([(w, espeak_word(w, voice, speed, pitch)) for w in words],
                            pause_pattern(pauses, rng, words))  # fmt: skip
        cases.append(Case(name, text, audio, truth, intelligible=voice != "de"))
    base = cases[0]
    for name, kind, snr in DEGRADED[:2] if quick else DEGRADED:
        bed = pink_noise(len(base.audio), rng) if kind == "noise" else music_bed(len(base.audio), rng)
        cases.append(Case(f"en-us male, {name}", base.text, mix(base.audio, bed, snr), base.truth))
    return cases


CONTINUOUS = [
    ("en-us male", "en-us", 175, 50),
    ("en-us female (f3), 230 wpm", "en-us+f3", 230, 55),
    ("en-gb-x-rp male (m3), 150 wpm", "en-gb-x-rp+m3", 150, 30),
    ("en-gb-scotland, 200 wpm", "en-gb-scotland", 200, 50),
    ("en-us female (f5), 260 wpm", "en-us+f5", 260, 60),
]
"""Sentences said whole, as a TTS voice-over is: truth at each sentence's first and last word only."""


@functools.cache
def espeak_phrase(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    return espeak_word(text, voice, speed, pitch)


def continuous_cases(rng: np.random.Generator, quick: bool) -> list[Case]:
    cases = []
    for k, (name, voice, speed, pitch) in enumerate(CONTINUOUS[:2] if quick else CONTINUOUS):
        said = [SENTENCES[(5 * k + i) % len(SENTENCES)] for i in range(4)]
        audio, spans = join([(t, espeak_phrase(t, voice, speed, pitch)) for t in said],
                            lambda i: 0.3 + 0.4 * rng.random())  # fmt: skip
        truth = []
        for text, start, end in spans:
            words = text.split()
            truth += [(words[0], start, -1.0)] + [(w, -1.0, -1.0) for w in words[1:-1]] + [(words[-1], -1.0, end)]
        cases.append(Case(f"continuous: {name} (phrase edges)", " ".join(said), audio, truth, edges_only=True))
    return cases


def fetch_asterisk(cache: Path) -> Path | None:
    """The Asterisk English prompts (Debian package), downloaded and unpacked once into ``cache``."""
    root = cache / "asterisk"
    sounds = root / "usr/share/asterisk/sounds/en_US_f_Allison"
    if not sounds.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        try:
            for pkg in ("asterisk-core-sounds-en-wav", "asterisk-core-sounds-en"):
                subprocess.run(["apt-get", "download", pkg], cwd=root, check=True, capture_output=True)
            for deb in root.glob("*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"human corpus unavailable (apt-get download asterisk-core-sounds-en-wav): {exc}", flush=True)
            return None
    return sounds


def human_cases(cache: Path, rng: np.random.Generator, quick: bool) -> list[Case]:
    sounds = fetch_asterisk(cache)
    if sounds is None:
        return []
    with gzip.open(sounds.parents[2] / "doc/asterisk-core-sounds-en/core-sounds-en.txt.gz", "rt") as fh:
        listing = fh.read()
    prompts = {}
    for line in listing.splitlines():
        name, sep, text = line.partition(": ")
        if sep and (sounds / f"{name}.wav").is_file() and not name.startswith("letters/") and "[" not in text:
            prompts[name] = text.strip()

    def load(name: str) -> np.ndarray:
        x, rate = sf.read(sounds / f"{name}.wav", dtype="float32")
        return trim(resample_poly(x, SR, rate).astype(np.float32))

    single = sorted(n for n, t in prompts.items() if re.fullmatch(r"[A-Za-z']+[.!?]?", t))
    plain = re.compile(r"[A-Za-z' ,.?!-]+")
    phrase = sorted(n for n, t in prompts.items() if 4 <= len(t.split()) <= 12 and plain.fullmatch(t))
    cases = []
    for k in range(1 if quick else 3):
        names = list(rng.choice(single, 36, replace=False))
        words = [re.sub(r"[.!?]$", "", prompts[n]).lower() for n in names]
        audio, truth = join([(w, load(n)) for w, n in zip(words, names, strict=True)],
                            pause_pattern("normal", rng, words))  # fmt: skip
        cases.append(Case(f"human, single-word prompts, set {k + 1}", " ".join(words), audio, truth, group="human"))
    names = list(rng.choice(phrase, 8 if quick else 16, replace=False))
    audio, spans = join([(prompts[n], load(n)) for n in names], lambda i: 0.3 + 0.4 * rng.random())
    truth = []
    for text, start, end in spans:  # only the phrase edges are known
        words = text.split()
        truth += [(words[0], start, -1.0)] + [(w, -1.0, -1.0) for w in words[1:-1]] + [(words[-1], -1.0, end)]
    cases.append(Case("human, whole prompts (continuous speech; phrase edges)", " ".join(t for t, _, _ in spans),
                      audio, truth, group="human", edges_only=True))  # fmt: skip
    return cases


def librivox_cases(cache: Path) -> list[Case]:
    folder = cache / "librivox"
    if not folder.is_dir():
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                            "pocketsphinx==5.1.1", "-d", str(cache)], check=True, capture_output=True)  # fmt: skip
            import tarfile

            with tarfile.open(next(cache.glob("pocketsphinx-*.tar.gz"))) as tar:
                members = [m for m in tar.getmembers() if "/test/data/librivox/" in m.name]
                for m in members:
                    m.name = "librivox/" + m.name.split("/test/data/librivox/")[1]
                tar.extractall(cache, members=members, filter="data")
        except (OSError, subprocess.CalledProcessError, StopIteration) as exc:
            print(f"LibriVox clips unavailable (pip download pocketsphinx sdist): {exc}", flush=True)
            return []
    cases = []
    for wav in sorted(folder.glob("*.wav")):
        audio, _ = sf.read(wav, dtype="float32")
        ref = [w for w in json.loads(wav.with_suffix(".json").read_text())["w"] if not w["t"].startswith("<")]
        text = wav.with_suffix(".txt").read_text().strip()
        truth = [(w["t"], w["b"], w["b"] + w["d"]) for w in ref]
        cases.append(Case(f"LibriVox {wav.stem[-4:]}", text, audio, truth, group="librivox"))
    return cases


# --------------------------------------------------------------------------- measuring


def errors(analysis: SpeechAnalysis, case: Case) -> tuple[list[float], int, int]:
    """|error| of each known boundary of a found word; words not found; spoken words of zero length.

    Script words with nothing to say ("...", "—") have zero length by design and are not counted.
    """
    errs: list[float] = []
    said = [bool(w.tokens) for w in normalize_script(case.text)]
    for w, (_, start, end) in zip(analysis.words, case.truth, strict=False):
        if not w.found or w.end <= w.start:
            continue
        if start >= 0:
            errs.append(abs(w.start - start))
        if end >= 0:
            errs.append(abs(w.end - end))
    zero = sum(w.found and w.end <= w.start and s for w, s in zip(analysis.words, said, strict=True))
    return errs, sum(not w.found for w in analysis.words), zero


def stats(errs: list[float]) -> dict:
    if not errs:
        return {"median_ms": None, "p95_ms": None, "max_ms": None}
    arr = np.array(errs) * 1000
    return {k: round(float(v), 1) for k, v in
            (("median_ms", np.median(arr)), ("p95_ms", np.percentile(arr, 95)), ("max_ms", arr.max()))}  # fmt: skip


TARGETS = {"median_ms": 30.0, "p95_ms": 120.0, "not_found": 0, "rtf_cpu": 20.0}
"""Issue #15's targets for the default offline aligner, per condition."""


def meets(row: dict) -> bool:
    """Whether a condition's row meets every target in TARGETS."""
    if "error" in row or row["median_ms"] is None:
        return False
    return (row["median_ms"] <= TARGETS["median_ms"] and row["p95_ms"] <= TARGETS["p95_ms"]
            and row["not_found"] <= TARGETS["not_found"] and row["rtf_cpu"] >= TARGETS["rtf_cpu"])  # fmt: skip


def run_aligner(align: Callable[[np.ndarray, str], SpeechAnalysis], cases: list[Case]) -> dict:
    rows, all_errs = [], {"all": [], "targets": []}
    # Warm up (models and decoders load once per process in a batch): not part of any condition's time.
    align(cases[0].audio[: 3 * SR], cases[0].text.split()[0])
    for case in cases:
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            analysis = align(case.audio, case.text)
        except RowFailure as exc:
            rows.append({"condition": case.name, "error": exc.reason})
            continue
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        errs, not_found, zero = errors(analysis, case)
        seconds = len(case.audio) / SR
        row = {"condition": case.name, "group": case.group, "words": len(analysis.words), "boundaries": len(errs),
               **stats(errs), "not_found": not_found, "zero_length": zero,
               "not_found_words": [w.word for w in analysis.words if not w.found][:8],
               "rtf_cpu": round(seconds / max(cpu, 1e-9), 1), "rtf_wall": round(seconds / max(wall, 1e-9), 1),
               "audio_s": round(seconds, 1), "fit": analysis.fit_score, "flags": analysis.flags}  # fmt: skip
        row["meets_targets"] = meets(row)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "flags"}), flush=True)
        if case.group != "librivox":
            all_errs["all"] += errs
            if case.intelligible:
                all_errs["targets"] += errs
    target_rows = [r for r, c in zip(rows, cases, strict=True) if c.intelligible and c.group != "librivox"]
    cpu_total = sum(r.get("audio_s", 0) / r["rtf_cpu"] for r in target_rows if "rtf_cpu" in r)
    return {"conditions": rows, "overall": stats(all_errs["all"]), "targets_overall": stats(all_errs["targets"]),
            "not_found_intelligible": sum(r.get("not_found", 0) for r in target_rows),
            "rtf_cpu_overall": round(sum(r.get("audio_s", 0) for r in target_rows) / max(cpu_total, 1e-9), 1),
            }  # fmt: skip


def fit_calibration(align: Callable[[np.ndarray, str], SpeechAnalysis], cases: list[Case]) -> dict:
    """Each case with its own script and with another case's (a wrong file): the audio_script_mismatch verdict."""
    rows = []
    for i, case in enumerate(cases):
        other = next(c for c in cases[i + 1 :] + cases[:i] if c.text != case.text)
        row = {"condition": case.name, "intelligible": case.intelligible}
        for label, text in (("own", case.text), ("wrong", other.text)):
            try:
                a = align(case.audio, text)
                row[label] = {"fit": a.fit_score, "not_found": sum(not w.found for w in a.words),
                              "mismatch": any(f.startswith("audio_script_mismatch") for f in a.flags)}  # fmt: skip
            except RowFailure as exc:
                row[label] = {"fit": None, "mismatch": True, "failure": exc.reason[:80]}
        rows.append(row)
        print("fit", json.dumps(row), flush=True)
    own = [r["own"]["fit"] for r in rows if r["intelligible"] and r["own"]["fit"] is not None]
    wrong = [r["wrong"]["fit"] for r in rows if r["wrong"]["fit"] is not None]
    return {
        "cases": rows,
        "own_fit_min_intelligible": min(own, default=None),
        "wrong_fit_max": max(wrong, default=None),
        "wrong_all_flagged": all(r["wrong"]["mismatch"] for r in rows),
        "own_flagged_intelligible": [r["condition"] for r in rows if r["intelligible"] and r["own"]["mismatch"]],
    }


def long_talk(minutes: float, rng: np.random.Generator, voice: str = "en-us", speed: int = 175) -> dict:
    """A synthetic talk of ``minutes`` in ``voice``: aligned in one call, then planned as the pipeline plans it
    (the row's audio and alignment); cuts checked against the true word spans."""
    words: list[str] = []
    ends: set[int] = set()
    while len(words) < minutes * 60 * 3.2:
        words += SENTENCES[len(ends) % len(SENTENCES)].split()
        ends.add(len(words) - 1)
    pieces = [(w, espeak_word(w, voice, speed, 50)) for w in words]
    audio, truth = join(pieces, pause_pattern("normal", rng, words, ends))
    audio = audio[: int(minutes * 60 * SR)]
    keep = [t for t in truth if t[2] * SR <= len(audio)]
    text = " ".join(t[0] for t in keep)
    case = Case(f"long talk ({voice})", text, audio, keep)
    cpu, wall = time.process_time(), time.perf_counter()
    analysis = align_words(audio, text)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    errs, not_found, zero = errors(analysis, case)
    words_ok = None if analysis.approximate else analysis.words
    plan = plan_row("talk", len(audio), words_ok, seed=1, width=832, height=480, audio=audio, speech=analysis)
    cuts = [s.start_sample for s in plan.segments[1:]]
    inside = [c / SR for c in cuts for _, s, e in keep if s * SR < c < e * SR]
    unsafe = [f for f in plan.flags if f.startswith("unsafe_cut")]
    seconds = len(audio) / SR
    result = {"voice": voice, "audio_s": round(seconds, 1), "words": len(keep), **stats(errs),
              "not_found": not_found, "zero_length": zero, "rtf_cpu": round(seconds / cpu, 1),
              "rtf_wall": round(seconds / wall, 1), "fit": analysis.fit_score, "align_flags": analysis.flags,
              "segments": len(plan.segments), "cuts_inside_true_words": len(inside),
              "cuts_inside_true_words_unflagged": len(inside) if not unsafe else None,
              "cuts_on_frame_boundaries": all(c % (SR // 16) == 0 for c in cuts),
              "plan_flags": plan.flags}  # fmt: skip
    result["meets_targets"] = meets(result)
    print("long talk", json.dumps(result), flush=True)
    return result


def random_large_ctc(device: str) -> Callable[[np.ndarray, str], SpeechAnalysis]:
    """The CTC aligner on a random Wav2Vec2ForCTC with wav2vec2-large-xlsr-53's shape (315 M parameters)."""
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,  # fmt: skip
    )

    from tasks.speech.ctc import CtcAligner

    torch.manual_seed(0)
    torch.set_num_threads(1)
    chars = "'abcdefghijklmnopqrstuvwxyz"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4} | {c: i + 5 for i, c in enumerate(chars)}
    folder = Path(tempfile.mkdtemp())
    (folder / "vocab.json").write_text(json.dumps(vocab))
    config = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                            intermediate_size=4096, feat_extract_norm="layer", do_stable_layer_norm=True,
                            conv_bias=True, pad_token_id=0)  # fmt: skip
    model = Wav2Vec2ForCTC(config)
    processor = Wav2Vec2Processor(
        feature_extractor=Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0,
                                                   do_normalize=True, return_attention_mask=True),
        tokenizer=Wav2Vec2CTCTokenizer(str(folder / "vocab.json")),
    )  # fmt: skip
    aligner = CtcAligner(model, processor, "random wav2vec2-large (315 M)", device)
    return aligner.align


def markdown(name: str, result: dict) -> str:
    lines = [f"\n{name}\n",
             "| condition | words | median ms | p95 ms | max ms | not found | zero-length | × real time per core "
             "| targets |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["conditions"]:
        if "error" in r:
            lines.append(f"| {r['condition']} | – | – | – | – | RowFailure: {r['error'][:60]} | – | – | not met |")
            continue
        met = "–" if r["group"] == "librivox" else ("met" if r["meets_targets"] else "**not met**")
        lines.append(f"| {r['condition']} | {r['words']} | {r['median_ms']} | {r['p95_ms']} | {r['max_ms']} | "
                     f"{r['not_found']} | {r['zero_length']} | {r['rtf_cpu']} | {met} |")  # fmt: skip
    t = result["targets_overall"]
    lines.append(f"| **all intelligible conditions** | | **{t['median_ms']}** | **{t['p95_ms']}** | {t['max_ms']} | "
                 f"**{result['not_found_intelligible']}** | | **{result['rtf_cpu_overall']}** | |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few conditions only")
    ap.add_argument("--no-human", action="store_true", help="skip the Asterisk and LibriVox recordings")
    ap.add_argument("--long-minutes", type=float, default=12.0, help="length of the synthetic talks (0: skip)")
    ap.add_argument("--long-voices", default="en-us,en-gb-x-gbcwmd+f4", help="espeak-ng voices of the talks")
    ap.add_argument("--chunked", action="store_true", help="also run every condition through the long-audio "
                    "method (chunk by chunk), which the conditions (all under a minute) do not otherwise reach")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/s2v-batch/bench-speech")
    ap.add_argument("--ctc-model", type=Path, help="also measure the CTC aligner with this Wav2Vec2ForCTC folder")
    ap.add_argument("--ctc-random-large", action="store_true", help="also measure the CTC aligner on a random "
                    "wav2vec2-large (speed only)")  # fmt: skip
    ap.add_argument("--ctc-device", default="cpu")
    ap.add_argument("--ctc-only", action="store_true", help="measure the CTC aligner only")
    ap.add_argument("--no-fit", action="store_true", help="skip the fit calibration")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    cases = espeak_cases(rng, args.quick) + continuous_cases(np.random.default_rng(1), args.quick)
    if not args.no_human:
        args.cache.mkdir(parents=True, exist_ok=True)
        cases += human_cases(args.cache, rng, args.quick) + librivox_cases(args.cache)
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "affinity": sorted(os.sched_getaffinity(0)), "python": platform.python_version(),
                                 "load": os.getloadavg()}}  # fmt: skip
    if not args.ctc_only:
        results["offline"] = run_aligner(align_words, cases)
        print(markdown("offline aligner (tasks.speech.offline)", results["offline"]), flush=True)
        if args.chunked:
            results["offline_chunked"] = run_aligner(chunked_align_words, cases)
            print(markdown("offline aligner, long-audio method", results["offline_chunked"]), flush=True)
        if not args.no_fit:
            results["fit_offline"] = fit_calibration(align_words, [c for c in cases if c.group != "librivox"])
            print("fit", json.dumps({k: v for k, v in results["fit_offline"].items() if k != "cases"}), flush=True)
        if args.long_minutes > 0:
            results["long_talks"] = [long_talk(args.long_minutes, np.random.default_rng(k), voice)
                                     for k, voice in enumerate(args.long_voices.split(","))]  # fmt: skip
    ctc = None
    if args.ctc_model:
        from tasks.speech.ctc import load_ctc_model

        ctc = load_ctc_model(args.ctc_model, args.ctc_device).align
    elif args.ctc_random_large:
        ctc = random_large_ctc(args.ctc_device)
    if ctc is not None:
        results["ctc"] = run_aligner(ctc, cases)
        print(markdown(f"CTC aligner ({args.ctc_device})", results["ctc"]), flush=True)
        if not args.no_fit:
            results["fit_ctc"] = fit_calibration(ctc, [c for c in cases if c.group != "librivox"])
            print("fit", json.dumps({k: v for k, v in results["fit_ctc"].items() if k != "cases"}), flush=True)
    results["machine"]["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def chunked_align_words(audio: np.ndarray, script: str) -> SpeechAnalysis:
    """The offline aligner made to take its long-audio path (chunks of ~15 s) on audio of any length."""
    saved = offline.FORCED_WHOLE_S, search.CHUNK_ABOVE_S
    offline.FORCED_WHOLE_S, search.CHUNK_ABOVE_S = 0.0, 0.0
    try:
        return align_words(audio, script)
    finally:
        offline.FORCED_WHOLE_S, search.CHUNK_ABOVE_S = saved


if __name__ == "__main__":
    main()
