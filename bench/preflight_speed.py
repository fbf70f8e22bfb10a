"""Everything before the GPU, timed: normalize, language checks, alignment and planning.

Part A, one long row: a 10-minute English speech file (espeak-ng, six voices and speeds, eight
sentences, spoken word by word with 0-250 ms pauses and 400-700 ms after every 8th word over a light
noise floor, as in bench/align_accuracy.py), upmixed to stereo 44.1 kHz and encoded as a 128 kbit/s
MP3 (or kept as WAV), with a 1080×1350 JPEG portrait. It goes through the flow's own per-row steps:
``flows.steps.normalize_step`` (fetch + audio/image normalization), ``speech_step`` (alignment, then
``tasks.speech.language.check_language``) and ``plan_step``, with default ``BatchSettings``. Each stage is
timed in wall time and CPU time (this process plus its ffmpeg children). The row runs twice in a
fresh process: pass 1 pays the one-time loads (pocketsphinx decoders, lingua's language models),
pass 2 (a new work folder, so nothing is cached) is the steady state of a batch worker. The process
runs once pinned to one core (``os.sched_setaffinity``; children inherit it) for the per-core figure,
and once unpinned.

Part B, many rows: a manifest of N rows (distinct ids) pointing at four real 20-34 s clips and two
portraits is validated with ``tasks.manifest.validate_manifest`` and then planned with
``flows.preflight.plan_manifest`` (which validates again, then runs the three steps per row) with
the alignment cached. The caches are the product's own: each row's work folder holds
``assets.json`` (keyed by the row's fingerprint) and ``speech.json`` beside hard links to the
normalized files. They are pre-populated from one real normalize + speech run per distinct clip,
because warming them by a first ``plan_manifest`` pass would normalize and align every row (hours
for 10,000 rows on this machine). The benchmark checks that the timed pass hit every cache.

Usage:
    .venv/bin/python bench/preflight_speed.py [--minutes 10] [--format mp3|wav] [--rows 10000]
        [--skip-long] [--skip-manifest] [--profile out.prof] [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image
from rich.console import Console
from scipy.signal import resample_poly

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from align_accuracy import SENTENCES, VOICES, known_speech  # noqa: E402

from flows import steps  # noqa: E402
from flows.preflight import plan_manifest  # noqa: E402
from flows.settings import BatchSettings  # noqa: E402
from tasks import layout  # noqa: E402
from tasks.manifest import validate_manifest  # noqa: E402
from tasks.media import ffmpeg_exe  # noqa: E402

SR = 16_000
UPLOAD_RATE = 44_100


# ---------------------------------------------------------------- fixtures


def speech_fixture(seconds: float, seed: int, voices: list[tuple[str, int]]) -> tuple[np.ndarray, str]:
    """At least `seconds` of 16 kHz word-by-word espeak-ng speech and its script."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    words: list[str] = []
    total = 0.0
    i = 0
    while total < seconds:
        voice, speed = voices[i % len(voices)]
        text = " ".join(SENTENCES[(2 * i + k) % len(SENTENCES)] for k in range(2)).split()
        audio, _ = known_speech(text, voice, speed, rng)
        parts.append(audio)
        words += text
        total += len(audio) / SR
        i += 1
    return np.concatenate(parts), " ".join(words).capitalize() + "."


def write_upload(audio_16k: np.ndarray, path: Path, fmt: str) -> Path:
    """The speech as a user uploads it: stereo 44.1 kHz, MP3 128 kbit/s or 16-bit WAV."""
    up = resample_poly(audio_16k, 441, 160).astype(np.float32)
    # The right channel slightly quieter and 0.3 ms late, so the stereo is not two identical channels.
    right = np.concatenate([np.zeros(13, np.float32), 0.9 * up[:-13]])
    stereo = np.stack([up, right], axis=1)
    wav = path.with_suffix(".wav")
    sf.write(wav, stereo, UPLOAD_RATE, subtype="PCM_16")
    if fmt == "wav":
        return wav
    mp3 = path.with_suffix(".mp3")
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-y", "-i", str(wav), "-c:a", "libmp3lame", "-b:a", "128k", str(mp3)],
        check=True,
    )
    wav.unlink()
    return mp3


def write_portrait(path: Path, seed: int) -> Path:
    """A 1080×1350 phone-camera-sized JPEG: a gradient with a face-sized ellipse and sensor noise."""
    rng = np.random.default_rng(seed)
    h, w = 1350, 1080
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x / w * 180 + 40, y / h * 120 + 60, np.full((h, w), 150.0)], axis=-1)
    face = ((x - w / 2) / 220) ** 2 + ((y - h * 0.38) / 290) ** 2 < 1
    img[face] = (224, 180, 150)
    img += rng.normal(0, 6, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- timing


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run fn; wall seconds, this process's CPU seconds and its (finished) children's CPU seconds."""
    w0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    out = fn()
    return out, {
        "wall_s": time.perf_counter() - w0,
        "cpu_s": time.process_time() - c0,
        "child_cpu_s": _children_cpu() - k0,
    }


def run_row(manifest: Path, work: Path, settings: BatchSettings) -> dict[str, Any]:
    """One pass of the flow's per-row steps over the manifest's single row, each stage timed."""
    row = validate_manifest(str(manifest)).rows[0]
    row_dir = layout.RowPaths.for_row(work, row.id).root
    assets, t_norm = timed(lambda: steps.normalize_step(row, row_dir, settings))
    speech, t_speech = timed(lambda: steps.speech_step(row, assets, settings))
    row_plan, t_plan = timed(lambda: steps.plan_step(row, assets, speech, settings))
    stages = {"normalize": t_norm, "align+language": t_speech, "plan": t_plan}
    dur = assets.duration_s
    for t in stages.values():
        t["rtf"] = dur / t["wall_s"]
    wall = sum(t["wall_s"] for t in stages.values())
    cpu = sum(t["cpu_s"] + t["child_cpu_s"] for t in stages.values())
    return {
        "audio_s": round(dur, 1),
        "words": len(speech.words),
        "fit_score": speech.fit_score,
        "approximate": speech.approximate,
        "flags": [f.split(":")[0] for f in speech.flags],
        "segments": len(row_plan.segments),
        "stages": {k: {n: round(v, 3) for n, v in t.items()} for k, t in stages.items()},
        "total_wall_s": round(wall, 2),
        "total_cpu_s": round(cpu, 2),
        "rtf_wall": round(dur / wall, 1),
        "rtf_cpu": round(dur / cpu, 1),
    }


def measure_long(manifest: Path, pin: bool, profile: str | None) -> dict[str, Any]:
    """Child-process entry: two passes over the long row (cold, then warm in a fresh work folder)."""
    if pin:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    settings = BatchSettings()
    result: dict[str, Any] = {"pinned": pin, "cores": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory() as tmp:
        result["cold"] = run_row(manifest, Path(tmp) / "cold", settings)
        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        result["warm"] = run_row(manifest, Path(tmp) / "warm", settings)
        if prof:
            prof.disable()
            prof.dump_stats(profile)
    return result


# ---------------------------------------------------------------- part B


def manifest_bench(root: Path, rows: int) -> dict[str, Any]:
    """Validate and plan `rows` rows over four real clips, with every row's caches in place."""
    media = root / "media"
    media.mkdir()
    clips = []
    for k in range(4):
        audio, script = speech_fixture(18, seed=100 + k, voices=[VOICES[k]])
        clips.append((write_upload(audio, media / f"clip{k}", "mp3"), script))
    images = [write_portrait(media / f"face{k}.jpg", seed=k) for k in range(2)]
    table = [
        {
            "id": f"lesson-{i:05d}",
            "audio": f"media/{clips[i % 4][0].name}",
            "image": f"media/{images[i % 2].name}",
            "script": clips[i % 4][1],
            "seed": str(i),
        }
        for i in range(rows)
    ]
    manifest = write_manifest(root / "manifest.csv", table)
    work = root / "work"
    settings = BatchSettings(work_dir=str(work))

    validation, t_validate = timed(lambda: validate_manifest(str(manifest)))
    assert len(validation.rows) == rows, validation.issues[:3]

    # One real normalize + speech run per distinct (clip, portrait), then each row's folder gets
    # hard links to those files and the two cache records, keyed as the steps key them.
    t0 = time.perf_counter()
    seeded: dict[tuple[str, str], tuple[Path, dict]] = {}
    for row in validation.rows:
        combo = (row.audio, row.image)
        if combo not in seeded:
            src_dir = root / "seed" / row.id
            assets = steps.normalize_step(row, src_dir, settings)
            steps.speech_step(row, assets, settings)
            seeded[combo] = (src_dir, assets.model_dump(mode="json"))
        src_dir, assets_doc = seeded[combo]
        row_dir = layout.RowPaths.for_row(work, row.id).root
        row_dir.mkdir(parents=True)
        doc = dict(assets_doc, row_id=row.id)
        for field in ("audio_16k", "audio_master", "image"):
            name = Path(assets_doc[field]).name
            os.link(src_dir / name, row_dir / name)
            doc[field] = str(row_dir / name)
        key = layout.row_fingerprint(row, {"pad_s": settings.pad_s, "max_audio_s": settings.max_audio_s})
        (row_dir / "assets.json").write_text(json.dumps({"key": key, "assets": doc}))
        shutil.copyfile(src_dir / "speech.json", row_dir / "speech.json")
    t_seed = time.perf_counter() - t0
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("*/*.json")}

    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    (plans, problems), t_plan = timed(lambda: plan_manifest(str(manifest), settings, console=quiet))
    assert len(plans) == rows and not problems, problems[:3]
    rewritten = sum(p.stat().st_mtime_ns != m for p, m in stamps.items())
    assert rewritten == 0, f"{rewritten} cache files were rewritten: the caches were missed"
    return {
        "rows": rows,
        "distinct_clips": len(seeded),
        "clip_s": [round(sf.info(Path(d) / "audio_16k.wav").duration, 1) for d, _ in seeded.values()],
        "segments": sum(len(p.segments) for p in plans),
        "validate_s": round(t_validate["wall_s"], 2),
        "plan_manifest_s": round(t_plan["wall_s"], 2),
        "plan_manifest_cpu_s": round(t_plan["cpu_s"], 2),
        "planning_only_s": round(t_plan["wall_s"] - t_validate["wall_s"], 2),
        "validate_then_plan_s": round(t_validate["wall_s"] + t_plan["wall_s"], 2),
        "cache_prepopulation_s (not timed as planning)": round(t_seed, 1),
    }


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--format", choices=("mp3", "wav"), default="mp3")
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--skip-manifest", action="store_true")
    ap.add_argument("--profile", help="cProfile stats of the pinned warm pass to this file")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # child process: the manifest to time
    ap.add_argument("--pin", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.measure:
        print(json.dumps(measure_long(Path(args.measure), args.pin, args.profile)))
        return

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.skip_long:
            audio, script = speech_fixture(args.minutes * 60, seed=0, voices=VOICES)
            upload = write_upload(audio, root / "talk", args.format)
            image = write_portrait(root / "portrait.jpg", seed=0)
            manifest = write_manifest(
                root / "one.csv", [{"id": "talk", "audio": upload.name, "image": image.name, "script": script}]
            )
            report["long_file"] = {"format": args.format, "bytes": upload.stat().st_size}
            for pin in (True, False):
                cmd = [sys.executable, __file__, "--measure", str(manifest)] + (["--pin"] if pin else [])
                if pin and args.profile:
                    cmd += ["--profile", args.profile]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                report["pinned" if pin else "unpinned"] = json.loads(out.strip().splitlines()[-1])
        if not args.skip_manifest:
            report["manifest"] = manifest_bench(root, args.rows)
    report["load_avg_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
