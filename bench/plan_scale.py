"""`plan` at scale (issue #16 item 8): rows per second over 1 and all processes, CPU seconds per row, the
peak memory of one long row at several audio lengths, and the work-file cache each row keeps.

Fixtures are the examples' real speech (manifests/examples/media: welcome.wav 6.1 s, thanks.flac
3.9 s) and portrait. Short rows: N rows (distinct ids, so each is normalized and aligned) alternating
the two clips, 5 s a row on average, all with the one portrait (`--distinct-portraits`: each row its
own copy with one pixel changed, so no row can reuse another's portrait work). Long rows: welcome.wav
repeated to each of `--long-minutes` (16-bit WAVs), the script the clip's script repeated as often.

Each plan runs `flows.preflight.plan_manifest` in a fresh child process (the product's own code, a
fresh work folder); the parent samples the resident memory of the child's whole process tree (pool
workers and their ffmpeg children) every 50 ms with psutil and takes the tree's CPU time from
`getrusage(RUSAGE_CHILDREN)`. Figures:

* rows_per_s: rows / wall time of the plan, process start-up and imports included;
* rt_per_cpu: audio seconds planned per CPU second of the tree (the "≥ 20× real time per core" target);
* cpu_s_per_row, rt_per_cpu_steady: the same without the planning process's start-up (interpreter
  and imports, measured in the child before it plans; pool workers' own start-up stays in);
* peak_tree_rss_mb: the tree's largest summed RSS seen; peak_rss_mb: the planning process's own peak
  (getrusage, exact); long rows: their spread (largest / smallest) over the audio lengths;
* cache_bytes_per_row: bytes under each row's work folder after planning, by file;
* rerun_s: a second plan of the same manifest and work folder (every row from its cache).

Needs the project's packages and an ffmpeg (imageio-ffmpeg's, else one on PATH); no network.

Usage:
    .venv/bin/python bench/plan_scale.py [--rows 40] [--long-minutes 1 10 30] [--distinct-portraits]
                                         [--processes N] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import soundfile as sf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "manifests" / "examples" / "media"
CLIPS = {  # the examples' spoken clips (6.1 s and 3.9 s) and what they say
    "welcome.wav": "Welcome to the spring product update. Today we will walk through three new features in "
    "under a minute.",
    "thanks.flac": "Thank you for joining this course. See you in the next lesson!",
}


def fixtures(folder: Path, rows: int, distinct_portraits: bool) -> tuple[Path, float]:
    """The manifest of `rows` short rows; their audio seconds."""
    for name in [*CLIPS, "astronaut.jpg"]:  # rows may read only beside their manifest
        shutil.copyfile(EXAMPLES / name, folder / name)
    names = list(CLIPS)
    lengths = [sf.info(str(folder / n)).duration for n in names]
    portrait = np.asarray(Image.open(folder / "astronaut.jpg").convert("RGB"))
    short = folder / "short.csv"
    with short.open("w") as f:
        f.write("id,audio,image,script\n")
        for r in range(rows):
            name, image = names[r % len(names)], "astronaut.jpg"
            if distinct_portraits:  # the same picture, other bytes: no content-keyed reuse across rows
                image, pixels = f"portrait{r:05d}.png", portrait.copy()
                pixels[0, 0] = (r % 256, r // 256 % 256, 7)
                Image.fromarray(pixels).save(folder / image, compress_level=1)
            f.write(f'r{r:05d},{name},{image},"{CLIPS[name]}"\n')
    return short, sum(lengths[r % len(names)] for r in range(rows))


def long_fixture(folder: Path, minutes: float) -> tuple[Path, float]:
    """The manifest of one row of welcome.wav repeated to `minutes`; its audio seconds."""
    once, rate = sf.read(str(EXAMPLES / "welcome.wav"), dtype="int16")
    repeats = max(1, int(minutes * 60 / (len(once) / rate)))  # at most max_audio_s (30 min)
    wav = folder / f"long{minutes:g}.wav"
    with sf.SoundFile(str(wav), "w", rate, 1, "PCM_16") as out:  # a piece at a time
        for _ in range(repeats):
            out.write(once)
    manifest = folder / f"long{minutes:g}.csv"
    script = " ".join([CLIPS["welcome.wav"]] * repeats)
    manifest.write_text(f'id,audio,image,script\nlong,{wav.name},astronaut.jpg,"{script}"\n')
    return manifest, repeats * len(once) / rate


def child(manifest: str, work: str, processes: int) -> None:
    """Run in the child process: plan; print how many plans and problems, the CPU seconds spent before
    planning (start-up and imports) and this process's peak RSS."""
    from rich.console import Console

    from flows.preflight import plan_manifest
    from flows.settings import BatchSettings

    usage = resource.getrusage(resource.RUSAGE_SELF)
    settings = BatchSettings(work_dir=work, plan_processes=processes)
    plans, problems = plan_manifest(manifest, settings, console=Console(quiet=True))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    print(json.dumps({"plans": len(plans), "problems": problems, "startup_cpu_s": usage.ru_utime + usage.ru_stime,
                      "peak_rss_mb": round(peak_kb / 1024, 1)}))


def timed_plan(manifest: Path, work: Path, processes: int) -> dict[str, Any]:
    """Plan `manifest` in a child process; wall, tree CPU and peak tree RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--child", str(manifest), str(work), str(processes)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        total = 0
        with contextlib.suppress(psutil.Error):  # the tree changes while it is read
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
        peak = max(peak, total)
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"plan failed: {err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"processes": processes, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "startup_cpu_s": round(result["startup_cpu_s"], 2), "peak_tree_rss_mb": round(peak / 2**20, 1),
            "peak_rss_mb": result["peak_rss_mb"], "plans": result["plans"], "problems": result["problems"]}


def cache_bytes(work: Path) -> dict[str, Any]:
    """Bytes per row under the work folder, in all and by file name."""
    rows = [d for d in work.iterdir() if d.is_dir()]
    by_name: dict[str, int] = {}
    for d in rows:
        for f in d.rglob("*"):
            if f.is_file():
                by_name[f.name] = by_name.get(f.name, 0) + f.stat().st_size
    n = max(1, len(rows))
    by_file = {k: round(v / n) for k, v in sorted(by_name.items())}
    return {"per_row": round(sum(by_name.values()) / n), "by_file_per_row": by_file}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--long-minutes", type=float, nargs="+", default=[1.0, 10.0, 30.0],
                    help="lengths of the long rows, one plan each (at most max_audio_s, 30 min)")
    ap.add_argument("--processes", type=int, default=None, help="the 'all' run (default: the available cores)")
    ap.add_argument("--distinct-portraits", action="store_true", help="each short row its own portrait file")
    ap.add_argument("--quick", action="store_true", help="CI size: 6 rows, long rows of 1 and 3 minutes")
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    ap.add_argument("--child", nargs=3, metavar=("MANIFEST", "WORK", "PROCESSES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    if args.quick:
        args.rows, args.long_minutes = 6, [1.0, 3.0]
    sys.path.insert(0, str(ROOT))
    from flows.preflight import available_cores

    cores = args.processes or available_cores()
    summary: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "available_cores": available_cores(), "load_avg": os.getloadavg(),
                    "python": platform.python_version()},
        "rows": args.rows,
        "distinct_portraits": args.distinct_portraits,
    }
    with tempfile.TemporaryDirectory(prefix="plan_scale_") as tmp:
        folder = Path(tmp)
        short, short_audio_s = fixtures(folder, args.rows, args.distinct_portraits)
        summary["short_audio_s_per_row"] = round(short_audio_s / args.rows, 2)
        runs = []
        for processes in sorted({1, cores}):
            work = folder / f"work{processes}"
            run = timed_plan(short, work, processes)
            assert run["plans"] == args.rows, run["problems"]
            run["rows_per_s"] = round(args.rows / run["wall_s"], 3)
            run["rt_per_cpu"] = round(short_audio_s / run["cpu_s"], 1)
            steady = run["cpu_s"] - run["startup_cpu_s"]
            run["cpu_s_per_row"] = round(steady / args.rows, 3)
            run["rt_per_cpu_steady"] = round(short_audio_s / steady, 1)
            rerun = timed_plan(short, work, processes)
            run["rerun_s"] = rerun["wall_s"]
            runs.append(run)
        summary["short"] = runs
        summary["speedup"] = round(runs[-1]["rows_per_s"] / runs[0]["rows_per_s"], 2)
        summary["cache_bytes"] = cache_bytes(folder / f"work{cores}")
        if not args.skip_long:
            longs = []
            for minutes in args.long_minutes:
                manifest, audio_s = long_fixture(folder, minutes)
                run = timed_plan(manifest, folder / f"work_long{minutes:g}", 1)
                assert run["plans"] == 1, run["problems"]
                run["audio_s"] = round(audio_s, 1)
                run["rt_per_cpu"] = round(audio_s / run["cpu_s"], 1)
                longs.append(run)
                (folder / manifest.name.replace(".csv", ".wav")).unlink()
            summary["long"] = longs
            for key in ("peak_rss_mb", "peak_tree_rss_mb"):
                peaks = [r[key] for r in longs]
                summary[f"long_{key}_spread"] = round(max(peaks) / min(peaks), 3)
    summary["load_avg_after"] = os.getloadavg()
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
