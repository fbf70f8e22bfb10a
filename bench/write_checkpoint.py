"""Write a Wan2.2-S2V checkpoint with random weights in a real layout, full size by default
(issue 14, item 1): the project's own writer (`model.tiny.write_random_checkpoint`) behind a CLI.

    python3 bench/write_checkpoint.py /data/s2v-official --layout official --device cuda            # ~46 GB
    python3 bench/write_checkpoint.py /data/s2v-comfy --layout comfyui --fp8-scaled --device cuda \\
        --remove /data/s2v-official                                                              # ~26 GB
    python bench/write_checkpoint.py /tmp/x --layout comfyui --fp8-scaled --tiny                 # CPU smoke

Prints the estimated size per component and the free disk first, refuses when the set does not
fit (a 64 GB disk holds the official set or the ComfyUI fp8 set, not both: `--remove` deletes
the other one first, `--replace` empties OUT), then one line per finished file and a JSON summary
(bytes written, seconds, GB/s). Values are drawn on `--device` (a GPU: the full size in about a
minute plus the disk's write time); files appear under their names only when complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.tiny import Sizes, estimate_bytes, write_random_checkpoint  # noqa: E402

GB = 1e9
HEADROOM = 1.02  # headers, configs, tokenizer and filesystem slack over the tensor bytes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the checkpoint folder to write")
    parser.add_argument("--layout", choices=("official", "comfyui"), default="official")
    parser.add_argument("--fp8-scaled", action="store_true", help="comfyui: the scaled-fp8 DiT and umT5 files")
    parser.add_argument("--flat", action="store_true", help="comfyui: all files in OUT (default: ComfyUI's folders)")
    parser.add_argument("--device", default=None, help="where values are drawn (default cuda if available)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test sizes (CPU, seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replace", action="store_true", help="delete OUT first")
    parser.add_argument("--remove", type=Path, action="append", default=[], help="delete this folder first")
    parser.add_argument("--dry-run", action="store_true", help="print the estimate and stop")
    args = parser.parse_args(argv)
    if args.fp8_scaled and args.layout != "comfyui":
        parser.error("--fp8-scaled is a ComfyUI layout (--layout comfyui)")

    sizes = Sizes.tiny() if args.tiny else Sizes.full()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    estimate = estimate_bytes(sizes, args.layout, fp8_scaled=args.fp8_scaled)
    need = sum(estimate.values()) * HEADROOM
    for folder in [*args.remove, *([args.out] if args.replace else [])]:
        if folder.exists():
            print(f"removing {folder} ({_size(folder) / GB:.1f} GB)", flush=True)
            shutil.rmtree(folder)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty (another checkpoint?): --replace deletes it first")
    args.out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.out).free
    print(json.dumps({"estimate_gb": {k: round(v / GB, 2) for k, v in estimate.items()},
                      "total_gb": round(need / GB, 1), "free_gb": round(free / GB, 1)}), flush=True)  # fmt: skip
    if need > free:
        raise SystemExit(
            f"{args.out}: needs about {need / GB:.1f} GB, {free / GB:.1f} GB free; delete another checkpoint "
            "first (--remove PATH) or write elsewhere"
        )
    if args.dry_run:
        return {"estimate_bytes": estimate}

    started = time.perf_counter()

    def on_file(path: Path) -> None:
        print(f"{time.perf_counter() - started:7.1f} s  {path.stat().st_size / GB:8.3f} GB  {path}", flush=True)

    written = write_random_checkpoint(
        args.out, sizes, args.layout, fp8_scaled=args.fp8_scaled, flat=args.flat, device=device, seed=args.seed,
        on_file=on_file,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    summary = {
        "out": str(args.out), "layout": args.layout, "fp8_scaled": args.fp8_scaled, "device": device,
        "files": len(written.files), "bytes": written.bytes, "gb": round(written.bytes / GB, 2),
        "seconds": round(seconds, 1), "gb_per_s": round(written.bytes / GB / max(seconds, 1e-9), 2),
    }  # fmt: skip
    print(json.dumps(summary), flush=True)
    return summary


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


if __name__ == "__main__":
    main()
