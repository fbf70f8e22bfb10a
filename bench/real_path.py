"""The product's real path on a GPU (issue 14, item 1): `s2v-batch run --checkpoint` from a CSV to
MP4s through the Prefect flow (ephemeral API), the Ray pool and a CUDA worker, measured from outside.

    python3 bench/real_path.py /root/ckpt --out /root/run-official --json $OUT/real_path.json
    python3 bench/real_path.py /root/comfy --precision fp8 --rows 1 --out /root/run-fp8
    python bench/real_path.py --tiny --out /tmp/real-path        # CPU, tiny checkpoint, preview-sized run

It writes a manifest of up to three rows from the example media (`welcome`, long enough for two
segments with `--max-segment-s`, `safety`, and `thanks` with a pose video made here), runs
`python -m flows run` as a child process with a persistent compile cache, samples the GPU
(nvidia-smi: utilization and memory every 0.5 s) and the host's memory while it runs, then checks
every MP4 (video and AAC audio, as long as the row's audio) and prints one JSON summary:

    wall_s                  run start -> exit
    to_first_step_s         run start -> end of the first denoising step (report: rows' first_step_at)
    worker_load             the worker's load record: read / build / to_device seconds
    first_clip              conditioning + compilation before the first step (first_step_s), step_s
    seconds_per_clip        GPU seconds / clips generated, and the per-step median
    gpu_busy                mean GPU utilization from the first step to the run's end, and over the run
    peak_gpu_gib            nvidia-smi's largest memory.used
    host_ram_peak_gib       the largest (MemTotal - MemAvailable) during the run, less the value before it
    work_bytes              bytes under the work folder after the run (clips, states, normalized inputs)

Random weights say nothing about how a video looks; this measures the path, its time, memory and disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXAMPLES = ROOT / "manifests" / "examples" / "media"
ROWS = [  # id, audio, extra columns
    ("welcome", "welcome.wav", {}),
    ("safety", "safety.mp3", {}),
    ("thanks", "thanks.flac", {"pose_video": "pose.mp4"}),
]


def write_pose_video(path: Path, seconds: float, width: int = 480, height: int = 832) -> None:
    """A moving stick-figure-like pose render at 16 fps (the model reads any RGB video)."""
    import av
    import numpy as np

    frames = int(seconds * 16) + 1
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            x = int(width / 2 + 60 * np.sin(i / 8))
            img[height // 4 : height // 4 + 40, x - 20 : x + 20] = (255, 0, 0)  # head
            img[height // 4 + 40 : height * 2 // 3, x - 4 : x + 4] = (0, 255, 0)  # body
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_manifest(folder: Path, rows: int, steps: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    media = folder / "media"
    shutil.copytree(EXAMPLES, media, dirs_exist_ok=True)
    write_pose_video(media / "pose.mp4", 5.0)
    lines = ["id,audio,image,script,prompt,resolution,seed,steps,pose_video"]
    scripts = {
        "welcome": "Welcome to the spring product update. Today we will walk through three new features in under "
                   "a minute.",
        "safety": "Before you start, put on your safety glasses. Check that the guard is closed, then press the "
                  "green button.",
        "thanks": "Thank you for joining this course. See you in the next lesson!",
    }
    for row_id, audio, extra in ROWS[:rows]:
        pose = f"media/{extra['pose_video']}" if "pose_video" in extra else ""
        lines.append(f'{row_id},media/{audio},media/astronaut.jpg,"{scripts[row_id]}","A presenter speaking to '
                     f'the camera",480p,7,{steps},{pose}')
    manifest = folder / "batch.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


class Sampler(threading.Thread):
    """nvidia-smi utilization and memory, and the host's used memory, every `period` seconds."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period, self.samples, self.stop = period, [], threading.Event()
        self.gpu = shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.time()
            util = mem = None
            if self.gpu:
                try:
                    out = subprocess.run(
                        ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                        capture_output=True, text=True, timeout=5,
                    ).stdout.splitlines()[0]
                    util, mem = (float(v) for v in out.split(","))
                except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                    pass
            self.samples.append((t, util, mem, host_used_gib()))
            self.stop.wait(self.period)


def host_used_gib() -> float:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024**2


def folder_bytes(folder: Path) -> dict[str, int]:
    sizes = {"total": 0, "clips": 0, "states": 0}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            size = path.stat().st_size
            sizes["total"] += size
            if path.name.startswith("clip_") and path.suffix == ".mp4":
                sizes["clips"] += size
            elif ".state" in path.name:
                sizes["states"] += size
    return sizes


def check_video(path: Path) -> dict:
    import av

    with av.open(str(path)) as c:
        video = c.streams.video[0]
        audio = c.streams.audio[0] if c.streams.audio else None
        return {
            "duration_s": round(float(c.duration or 0) / 1e6, 3),
            "frames": video.frames,
            "size": f"{video.width}x{video.height}",
            "audio": audio.codec_context.name if audio else None,
        }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="checkpoint folder (official or ComfyUI), written beforehand")
    parser.add_argument("--out", type=Path, required=True, help="folder for the manifest, outputs and work files")
    parser.add_argument("--rows", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per clip (manifest column)")
    parser.add_argument("--max-segment-s", type=float, default=4.0, help="so the 6-7 s rows get two segments")
    parser.add_argument("--precision", default=None, help="bf16 | fp8 (default: the setting's)")
    parser.add_argument("--compile-cache", type=Path, default=None, help="S2V_CACHE_DIR for the run")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `run` options")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoint, CPU, in-process (mechanics only)")
    args = parser.parse_args(argv)

    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    manifest = write_manifest(out / "input", args.rows, args.steps)
    checkpoint = args.checkpoint
    cmd = [sys.executable, "-m", "flows", "run", str(manifest), "--out", str(out / "videos"),
           "--work-dir", str(out / "work"), "--max-segment-s", str(args.max_segment_s), "--min-segment-s", "1",
           # A random-weight checkpoint's wav2vec2 finds no script in any audio: render the rows anyway.
           "--mismatch-policy", "warn"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("PYTHONPATH", str(ROOT))
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a machine busy loading weights
    if args.tiny:
        from model.tiny import write_tiny_checkpoint

        checkpoint = str(write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "ckpt"))
        # the tests' 64x64-frame entry point (tests/cli_small_frames.py): minutes less of CPU VAE
        cmd[1:3] = ["-m", "cli_small_frames"]
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'tests'}"
        cmd += ["--device", "cpu"]
    if not checkpoint:
        parser.error("a checkpoint folder is needed (or --tiny)")
    cmd += ["--checkpoint", checkpoint]
    if args.precision:
        cmd += ["--precision", args.precision]
    cmd += args.extra
    if args.compile_cache:
        env["S2V_CACHE_DIR"] = str(args.compile_cache)

    sampler = Sampler()
    baseline = host_used_gib()
    sampler.start()
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    ended = time.time()
    sampler.stop.set()
    sampler.join()
    print(proc.stdout[-6000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)

    report_path = out / "videos" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"rows": []}
    rows = report.get("rows", [])
    videos = {r["id"]: check_video(out / "videos" / r["video"]) for r in rows if r.get("video")}
    firsts = [r["first_step_at"] for r in rows if r.get("first_step_at")]
    first_step = min(firsts) if firsts else None
    gpu_s = sum(r.get("gpu_s") or 0 for r in rows)
    clips = sum((r.get("clips") or 0) - (r.get("clips_reused") or 0) for r in rows)
    steps = [r["step_s"] for r in rows if r.get("step_s")]

    def busy(since: float) -> float | None:
        utils = [u for t, u, _, _ in sampler.samples if u is not None and t >= since]
        return round(statistics.fmean(utils) / 100, 3) if utils else None

    mems = [m for _, _, m, _ in sampler.samples if m is not None]
    result = {
        "command": " ".join(cmd),
        "exit_code": proc.returncode,
        "rows": {r["id"]: {k: r.get(k) for k in ("status", "error", "duration_s", "segments", "clips", "gpu_s",
                                                 "step_s", "flags")} for r in rows},
        "videos": videos,
        "wall_s": round(ended - started, 2),
        "to_first_step_s": round(first_step - started, 2) if first_step else None,
        "workers": report.get("workers", []),
        "gpu_seconds": round(gpu_s, 2),
        "clips_generated": clips,
        "gpu_s_per_clip": round(gpu_s / clips, 2) if clips else None,
        "step_s_median": statistics.median(steps) if steps else None,
        "gpu_busy_after_first_step": busy(first_step) if first_step else None,
        "gpu_busy_over_run": busy(started),
        "peak_gpu_gib": round(max(mems) / 1024, 2) if mems else None,
        "host_ram_peak_gib": round(max(h for *_, h in sampler.samples) - baseline, 2),
        "work_bytes": folder_bytes(out / "work"),
        "video_seconds": round(sum(v["duration_s"] for v in videos.values()), 2),
    }
    minutes = result["video_seconds"] / 60
    if minutes:
        extra = result["work_bytes"]["total"] - result["work_bytes"]["clips"]
        result["work_gb_per_video_minute_beyond_clips"] = round(extra / 1e9 / minutes, 3)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return result


if __name__ == "__main__":
    main()
