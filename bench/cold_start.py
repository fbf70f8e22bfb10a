"""Cold start of a worker (issue 14, item 2): from a fresh process to the first denoising step.

Starts a fresh Python process `--runs` times (default 2): the first with an empty compile cache
(unless `--cache-dir` already holds one), the next ones with the cache the first left (what a
second worker on the host sees); each run says which (`cache_state`). Each loads
the checkpoint with `S2VPipeline.from_checkpoint(compile_cache_dir=...)` and runs one clip until
its second denoising step, then stops. Printed as JSON per run:

    process_s       interpreter start and imports, until the child's first line runs `main`
    load            pipe.load_timings: check, read (disk -> device), build (modules, renaming, fp8),
                    to_device, per component
    conditioning_s  text + audio encoding and the reference latent of the clip
    first_step_s    the first denoising step (the DiT's compilation happens here)
    step_s          the second step (steady state); compile_s = first_step_s - step_s
    ready_s         process start -> end of the first step (the target: <= 60 s at full size)
    cache           Inductor FX-graph and AOTAutograd cache hits / misses in this process
    peak_gpu_gib, rss_gib

    python3 bench/cold_start.py /data/s2v-official --drop-page-cache          # H100, 480p, full size
    python3 bench/cold_start.py /data/s2v-comfy --precision fp8 --drop-page-cache
    python bench/cold_start.py --tiny                                        # CPU, tiny checkpoint

`--drop-page-cache` evicts the checkpoint's files from the page cache before each run
(posix_fadvise DONTNEED after a sync), so "read" is a disk read and not a copy from memory, as on
a freshly booted worker. `--tiny` writes the tiny checkpoint into a temporary folder and runs at
64x64, 8 frames on the CPU (compiled with Inductor's C++ backend, so the cache is exercised too).
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports: the child's process time counts from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
MARK = "COLD_START_RESULT "


class _Stop(Exception):
    """Raised from the step callback once the steps to time are done."""


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="*", help="checkpoint folder(s) or file(s) (model.layout.resolve)")
    parser.add_argument("--tiny", action="store_true", help="a tiny checkpoint written here, on the CPU")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", choices=("bf16", "fp8"), default=None)
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default 832x480; --tiny 64x64)")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default 80; --tiny 8)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None, help="compile cache (default: a new empty one)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--offload", default="none", choices=("none", "blocks", "model"))
    parser.add_argument("--drop-page-cache", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return [_child(json.loads(args.child))]
    if not args.tiny and not args.checkpoint:
        parser.error("give a checkpoint, or --tiny")

    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        checkpoint = args.checkpoint
        if args.tiny:
            from model.tiny import write_tiny_checkpoint

            checkpoint = [str(write_tiny_checkpoint(Path(tmp) / "tiny", seed=0))]
        width, height = map(int, (args.size or ("64x64" if args.tiny else "832x480")).split("x"))
        spec = {
            "checkpoint": checkpoint,
            "device": args.device or ("cpu" if args.tiny else None),
            "precision": args.precision,
            "width": width,
            "height": height,
            "frames": args.frames or (8 if args.tiny else 80),
            "compile": not args.no_compile,
            "offload": args.offload,
            "cache_dir": str(args.cache_dir or Path(tmp) / "compile-cache"),
        }
        results = []
        for run in range(args.runs):
            if args.drop_page_cache:
                drop_page_cache([Path(c) for c in checkpoint])
            cache = Path(spec["cache_dir"])
            cache_state = "warm" if cache.is_dir() and any(cache.iterdir()) else "empty"
            spawned = time.time()
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
            if proc.returncode or not lines:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                raise SystemExit(f"run {run + 1}: the child process failed (exit {proc.returncode})")
            result = json.loads(lines[-1][len(MARK) :])
            result["run"] = run + 1
            result["cache_state"] = cache_state
            result["process_s"] = round(result.pop("child_started") - spawned, 2)
            result["ready_s"] = round(result.pop("first_step_end") - spawned, 2)
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


def drop_page_cache(paths: list[Path]) -> None:
    """Evict the files under `paths` from the page cache (dirty pages are written first)."""
    os.sync()
    for root in paths:
        for path in [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _child(spec: dict) -> dict:
    child_started = STARTED
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    from model.pipeline import S2VPipeline

    imported = time.time()
    device = torch.device(spec["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = S2VPipeline.from_checkpoint(
        spec["checkpoint"], device=device, precision=spec["precision"], offload=spec["offload"],
        compile_dit=spec["compile"], compile_cache_dir=spec["cache_dir"] if spec["compile"] else None,
    )  # fmt: skip
    width, height, frames = spec["width"], spec["height"], spec["frames"]
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    t = np.arange(int(16_000 * (frames / 16 + 0.5))) / 16_000
    speech = (0.3 * np.sin(2 * np.pi * 150 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)

    marks: list[float] = []

    def on_step(clip: int, step: int, steps: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.time())
        if len(marks) == 2:
            raise _Stop

    generate_started = time.time()
    try:
        for _ in pipe.generate_clips(
            image.astype(np.uint8), speech, "A person talks to the camera.", num_clips=1, infer_frames=frames,
            on_step=on_step,
        ):  # fmt: skip
            pass
    except _Stop:
        pass
    first_step_s = marks[0] - generate_started - pipe.last_conditioning_s
    step_s = marks[1] - marks[0]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "checkpoint": pipe.files.describe(),
        "precision": pipe.precision,
        "size": f"{width}x{height}x{frames}",
        "compiled": spec["compile"],
        "child_started": child_started,
        "import_s": round(imported - child_started, 2),
        "load": pipe.load_timings.as_dict(),
        "conditioning_s": round(pipe.last_conditioning_s, 2),
        "first_step_s": round(first_step_s, 2),
        "step_s": round(step_s, 2),
        "compile_s": round(first_step_s - step_s, 2),
        "first_step_end": marks[0],
        "cache": {k: v for k, v in {**counters["inductor"], **counters["aot_autograd"]}.items() if "cache" in k},
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else 0,
        "rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),
    }
    print(MARK + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
