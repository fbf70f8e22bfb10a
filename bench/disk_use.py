"""Disk a batch uses beyond its finished clips, and how the continuation states are stored.

1. States (always): how the stage stores a continuation state (tasks/generate/stage.save_state)
   against np.savez, np.savez_compressed and, when installed, plain zstd and lz4: size over raw,
   write and read seconds (one thread where the codec has a choice), lossless checked. On two states:
   - a real one from the tiny wan-s2v model (random weights, the real architecture and clip loop,
     64x64 frames, 80-frame clips so all 73 carried frames are generated ones);
   - a synthetic one of the 480p shape: the example portrait at 832x480 in [-1, 1], drifting over
     73 frames, plus float noise (a float32 VAE decode's low mantissa bits are noise), and N(0, 1)
     motion latents [16, 19, 60, 104]: 357 MB raw, like the model's.
2. Work folder (`--batch`): runs a manifest through the batch flow (ephemeral Prefect API unless
   PREFECT_API_URL is set) while a thread samples the work folder every 0.2 s: bytes in clip files,
   in state files, and in everything else (normalized audio and image, segment audio, the stitched
   video), at their peak and at the end, per minute of video. Default: the example manifest on the
   preview backend (the mechanics: how many states are ever on disk at once). With
   `--checkpoint DIR --device cuda` it renders with the model at 480p, which gives the full-size figure.
   The line "480p projection" multiplies the peak number of state files by the stored size of the
   synthetic 480p state.

    .venv/bin/python bench/disk_use.py                       # states, then the example batch on preview
    .venv/bin/python bench/disk_use.py --no-batch --json states.json
    .venv/bin/python bench/disk_use.py --checkpoint /ckpt/Wan2.2-S2V-14B --device cuda --pool off

Run from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.generate.stage import STATE_SUFFIX, load_state, save_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def synthetic_480p_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = Image.open(ROOT / "manifests/examples/media/astronaut.jpg").convert("RGB").resize((832, 480))
    base = np.asarray(img).astype(np.float32) / 127.5 - 1
    frames = np.empty((3, 73, 480, 832), np.float32)
    for t in range(73):
        moved = np.roll(base, shift=(t // 8, t // 5), axis=(0, 1))
        noisy = moved + rng.normal(0, 0.02, base.shape).astype(np.float32)
        frames[:, t] = np.clip(noisy, -1, 1).transpose(2, 0, 1)
    latents = rng.standard_normal((16, 19, 60, 104)).astype(np.float32)
    return {"motion_frames": frames, "motion_latents": latents, "next_clip": np.array(1, np.int64)}


def tiny_model_state(folder: Path) -> dict[str, np.ndarray]:
    """The state after the first clip of a tiny wan-s2v segment (80 frames at 64x64, 2 steps)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from paced import tiny_s2v_job

    from tasks.generate.wan_s2v import WanS2VGenerator
    from tasks.records import Segment

    checkpoint, job = tiny_s2v_job(folder)
    seg = Segment(index=0, start_sample=0, end_sample=16000, start_s=0, end_s=10, frames=160, clips=2, seed=5)
    job = job.model_copy(update={"segment": seg, "infer_frames": 80})
    clip = next(WanS2VGenerator(checkpoint, device="cpu").clips(job))
    return clip.state


def _timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def measure_state(name: str, state: dict[str, np.ndarray], folder: Path) -> list[dict]:
    raw = sum(v.nbytes for v in state.values())
    rows = []

    def record(method: str, size: int, write_s: float, read_s: float, lossless: bool) -> None:
        rows.append({"state": name, "method": method, "raw_mb": round(raw / 1e6, 1), "ratio": round(size / raw, 4),
                     "write_s": round(write_s, 2), "read_s": round(read_s, 2), "lossless": lossless})

    def same(back: dict) -> bool:
        return back.keys() == state.keys() and all(back[k].tobytes() == state[k].tobytes() for k in state)

    for method, save in (("np.savez", np.savez), ("np.savez_compressed", np.savez_compressed)):
        buf = io.BytesIO()
        _, write_s = _timed(lambda save=save, buf=buf: save(buf, **state))

        def read(buf=buf) -> dict:
            with np.load(io.BytesIO(buf.getvalue())) as data:
                return {k: data[k] for k in data.files}

        back, read_s = _timed(read)
        record(method, len(buf.getvalue()), write_s, read_s, same(back))

    path = folder / f"{name}{STATE_SUFFIX}"
    _, write_s = _timed(lambda: save_state(state, path))
    back, read_s = _timed(lambda: load_state(path))
    record("stage: blosc2 zstd-1 + shuffle", path.stat().st_size, write_s, read_s, same(back))

    blob = b"".join(np.ascontiguousarray(v).tobytes() for v in state.values())
    try:
        import zstandard

        packed, write_s = _timed(lambda: zstandard.ZstdCompressor(level=3).compress(blob))
        unpacked, read_s = _timed(lambda: zstandard.ZstdDecompressor().decompress(packed))
        record("zstd-3 (zstandard)", len(packed), write_s, read_s, unpacked == blob)
    except ImportError:
        pass
    try:
        import lz4.frame

        packed, write_s = _timed(lambda: lz4.frame.compress(blob))
        unpacked, read_s = _timed(lambda: lz4.frame.decompress(packed))
        record("lz4 (frame)", len(packed), write_s, read_s, unpacked == blob)
    except ImportError:
        pass
    return rows


class FolderSampler:
    """Bytes under a folder by kind, sampled in a thread: clips, states, other; peaks and the last sample."""

    def __init__(self, folder: Path, every_s: float = 0.2):
        self.folder, self.every_s = folder, every_s
        self.peak = {"clips": 0, "states": 0, "other": 0, "beyond_clips": 0, "state_files": 0}
        self.last: dict[str, int] = dict(self.peak)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        now = {"clips": 0, "states": 0, "other": 0, "state_files": 0}
        for path in self.folder.rglob("*") if self.folder.exists() else []:
            try:
                size = path.stat().st_size if path.is_file() else 0
            except FileNotFoundError:  # renamed or dropped while walking
                continue
            if ".state." in path.name:
                now["states"] += size
                now["state_files"] += 1
            elif path.name.startswith("clip_") and path.suffix == ".mp4":
                now["clips"] += size
            else:
                now["other"] += size
        now["beyond_clips"] = now["states"] + now["other"]
        return now

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last = self.sample()
            self.peak = {k: max(v, self.last[k]) for k, v in self.peak.items()}
            self._stop.wait(self.every_s)

    def __enter__(self) -> FolderSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.last = self.sample()
        self.peak = {k: max(v, self.last[k]) for k, v in self.peak.items()}


def measure_batch(manifest: str, out: Path, options: dict) -> dict:
    from flows.batch import batch
    from flows.settings import BatchSettings

    work = out / ".s2v" / "work"
    settings = BatchSettings(**options)
    with FolderSampler(work) as sampler:
        report = asyncio.run(batch(manifest, str(out), settings))
    minutes = sum(r.get("duration_s") or 0 for r in report["rows"] if r["status"] == "succeeded") / 60
    per_min = {f"{k}_gb_per_min": round(v / GB / minutes, 4) if minutes else None for k, v in sampler.peak.items()
               if k != "state_files"}
    return {
        "manifest": manifest, "backend": report["backend"], "counts": report["counts"],
        "video_minutes": round(minutes, 3), "peak": sampler.peak, "end": sampler.last,
        "peak_per_video_minute": per_min,
        "end_beyond_clips_gb_per_min": round(sampler.last["beyond_clips"] / GB / minutes, 4) if minutes else None,
        "gpu_s": sum(r.get("gpu_s") or 0 for r in report["rows"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-batch", dest="batch", action="store_false", help="measure the state formats only")
    parser.add_argument("--no-tiny", dest="tiny", action="store_false", help="skip the tiny model's state")
    parser.add_argument("--manifest", default=str(ROOT / "manifests/examples/batch.csv"))
    parser.add_argument("--checkpoint", help="render with wan-s2v from this checkpoint (else the preview backend)")
    parser.add_argument("--device", help="torch device for wan-s2v")
    parser.add_argument("--pool", default="off", choices=["auto", "on", "off"])
    parser.add_argument("--out", type=Path, help="output folder of the batch (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    results: dict = {"states": []}
    with tempfile.TemporaryDirectory(prefix="disk-use-") as tmp:
        tmp = Path(tmp)
        if args.tiny:
            results["states"] += measure_state("tiny-model-64x64", tiny_model_state(tmp / "tiny"), tmp)
        big = synthetic_480p_state()
        results["states"] += measure_state("synthetic-480p", big, tmp)
        stored_480p = next(r for r in results["states"] if r["state"] == "synthetic-480p" and r["method"].startswith(
            "stage"))["ratio"] * sum(v.nbytes for v in big.values())
        del big
        print("| state | method | raw MB | stored / raw | write s | read s | lossless |\n|---|---|---|---|---|---|---|")
        for r in results["states"]:
            print(f"| {r['state']} | {r['method']} | {r['raw_mb']} | {r['ratio']} | {r['write_s']} | {r['read_s']} | "
                  f"{r['lossless']} |")
        if args.batch:
            options = {"pool": args.pool}
            if args.checkpoint:
                options |= {"backend": "wan-s2v", "checkpoint": args.checkpoint, "device": args.device}
            out = args.out or tmp / "out"
            run = measure_batch(args.manifest, out, options)
            run["projection_480p_peak_state_gb"] = round(run["peak"]["state_files"] * stored_480p / GB, 3)
            results["batch"] = run
            print(json.dumps(run, indent=1))
            print(f"\n480p projection: at most {run['peak']['state_files']} state file(s) on disk at once x "
                  f"{stored_480p / GB:.3f} GB = {run['projection_480p_peak_state_gb']} GB, whatever the video's length")
    results["machine"] = {"cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
