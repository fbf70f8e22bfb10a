"""GPU-seconds per 80-frame 480p clip for the speed presets exact / balanced / fast, bf16 and with
fp8 block linears, side by side in one process, with the DiT passes each actually ran (issue #18).

The whole `S2VPipeline` at its released sizes with random weights, built as bench/pipeline_memory.py
builds it (the 14B DiT on the meta device, filled on the GPU; umT5-xxl, wav2vec2, the Wan2.1 VAE),
compiled blocks and FA4 self-attention where they run, as the worker runs it. One first clip per
measurement (later clips carry motion tokens and cost ~10 % more per pass; not timed here).

What is measured and what is derived, to fit one GPU call of < 8 minutes (the output says which):

1. a warm-up clip of 2 steps, one guided and one conditional, compiles both graphs (not timed);
2. exact: a clip of `--exact-steps` (4) steps with per-step timestamps; the 40-step clip is that
   clip plus (40 - 4) x the median step (every exact step is the same CFG batch of 2). Each clip
   is a one-clip segment, which skips the VAE encode of the 73 carried frames that every other clip
   pays: that encode is timed once and added to every row;
3. balanced and fast: whole clips, timed; their per-step log (guided or not, computed or reused)
   gives the DiT passes run;
4. a conditional-only clip of `--exact-steps` steps gives the seconds of a step without guidance;
5. fp8 (`quantize_linears_fp8`, in place): steps 1, 2 and 4 again; balanced and fast are derived
   from their bf16 step logs and the fp8 step times (`--fp8-whole` runs them whole instead, ~3 min
   more). Derived rows are checked against the measured bf16 rows in the same way (`model_s`).

Random weights: the step caches decide on the outputs of a random network here, so the passes they
skip say nothing of what they skip on real weights; quality at each preset must be judged with
`s2v-batch calibrate` on the real weights. The output says so.

    python3 bench/presets_speed.py --json $OUT/presets_speed.json       # one H100, ~6-7 minutes
    .venv/bin/python bench/presets_speed.py --tiny                        # CPU, same code, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model.attention import fa4_unavailable
from model.audio_encoder import SAMPLE_RATE
from model.checkpoint import fp8_supported, quantize_linears_fp8
from model.pipeline import S2VPipeline
from model.presets import PRESETS, SpeedConfig
from model.speed import StepLog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_memory import build_pipeline  # noqa: E402  (full-size random pipeline; meta + GPU init)

TARGETS_S = {"exact": 220.0, "balanced": 110.0, "fast": 60.0}
NEED_S = {"balanced": 110.0, "fast": 60.0, "fp8": 110.0}
"""About how long each stage takes on an H100 (fp8: recompilation and the step timings)."""
NOTE = (
    "random weights: the speed is the real model's, but the step caches decide on a random network's outputs, so "
    "the passes they skip here say nothing of real weights; quality at each preset must be judged with "
    "`s2v-batch calibrate` on the real weights"
)


class Bench:
    def __init__(self, pipe: S2VPipeline, args, device: torch.device) -> None:
        self.pipe, self.args, self.device = pipe, args, device
        rng = np.random.default_rng(args.seed)
        self.image = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
        audio_s = args.frames / 16 + 0.5
        self.audio = (0.1 * rng.standard_normal(int(audio_s * SAMPLE_RATE))).astype(np.float32)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clip(self, speed: SpeedConfig | None, steps: int = 40, stamps: bool = False) -> dict:
        """One first clip; with `stamps` the seconds of each step after the first (synchronised).
        An exact clip runs the plain guided call (no step log); other configs log each step."""
        marks: list[float] = []

        def on_step(clip: int, step: int, total: int) -> None:
            self.sync()
            marks.append(time.perf_counter())

        (out,) = self.pipe.generate_clips(
            self.image, self.audio, "a person talks to the camera", num_clips=1, infer_frames=self.args.frames,
            steps=steps, speed=speed, on_step=on_step if stamps else None,
        )  # fmt: skip
        steps_s = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        return {"seconds": out.seconds, "forwards": out.forwards, "log": out.steps, "step_seconds": steps_s}


def modelled(log: StepLog, guided_s: float, cond_s: float, overhead_s: float) -> float:
    """Clip seconds from a step log: each computed step at its kind's time, plus the clip's overhead."""
    runs = zip(log.guided, log.computed, strict=True)
    return overhead_s + sum((guided_s if g else cond_s) for g, run in runs if run)


def step_times(bench: Bench, n: int, carry_s: float) -> dict:
    """Seconds of a guided (CFG batch of 2) and a conditional step, and the clip's other work: what the
    timed clip spent outside its steps, plus `carry_s` (a one-clip segment skips the carry's encode)."""
    exact = bench.clip(None, steps=n, stamps=True)
    cond = bench.clip(SpeedConfig(steps=n, cfg_steps=0), steps=n, stamps=True)
    guided_s = statistics.median(exact["step_seconds"])
    cond_s = statistics.median(cond["step_seconds"])
    other = max(0.0, exact["seconds"] - n * guided_s) + carry_s
    return {
        "guided_step_s": guided_s, "cond_step_s": cond_s, "other_s": other, "carry_encode_s": carry_s,
        "subset_clip_s": exact["seconds"] + carry_s,
    }  # fmt: skip


def carry_encode_s(bench: Bench) -> float:
    """Seconds of the VAE encode of the 73 carried frames, which every clip but a segment's last pays."""
    pipe = bench.pipe
    video = torch.zeros(1, 3, pipe.config.motion_frames, bench.args.height, bench.args.width, device=bench.device)
    with torch.no_grad():
        pipe.vae.encode(video)  # cuDNN picks its kernels on the first call
        bench.sync()
        t0 = time.perf_counter()
        pipe.vae.encode(video)
        bench.sync()
    return time.perf_counter() - t0


def run(args) -> dict:
    device = torch.device(args.device)
    started = time.perf_counter()
    pipe = build_pipeline(args, device)
    attention = "fa4" if device.type == "cuda" and not fa4_unavailable(device) else "sdpa"
    pipe.transformer.set_attention(attention, device)
    if device.type == "cuda" and not args.no_compile:
        pipe.transformer.compile_blocks(dynamic=False)
    full_size = (args.height, args.width, args.frames) == (480, 832, 80) and not args.tiny
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "attention": attention,
        "compiled": device.type == "cuda" and not args.no_compile,
        "size": [args.height, args.width],
        "frames": args.frames,
        "clip": "first clip of a segment",
        "note": NOTE,
        "built_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(info), flush=True)
    bench = Bench(pipe, args, device)
    results: list[dict] = []
    full = 40

    def emit(row: dict) -> None:
        row = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
        results.append(row)
        print(json.dumps(row), flush=True)

    def over_budget(what: str, need_s: float) -> bool:
        """True (and said so) when `what`, taking about `need_s` on an H100, would end past the budget."""
        scale = need_s if device.type == "cuda" else 0.0
        if time.perf_counter() - started + scale > args.budget_s:
            emit({"skipped": what, "reason": f"would end past the --budget-s of {args.budget_s:.0f} s"})
            return True
        return False

    logs: dict[str, StepLog] = {}
    carry_s = carry_encode_s(bench)
    dense = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[pipe.dtype]
    for precision in (dense, "fp8"):
        if precision == "fp8":
            if args.no_fp8 or over_budget("fp8", NEED_S["fp8"]):
                break
            if device.type == "cuda" and not fp8_supported(device):
                emit({"skipped": "fp8", "reason": "no fp8 matmuls on this GPU"})
                break
            if device.type == "cuda":  # compiled graphs hold the bf16 weights: drop them before quantizing
                torch._dynamo.reset()
                gc.collect()
                torch.cuda.empty_cache()
            info["fp8_layers"] = quantize_linears_fp8(pipe.transformer)
        t0 = time.perf_counter()
        bench.clip(SpeedConfig(steps=2, cfg_steps=1), steps=2)  # compiles the batch-2 and batch-1 graphs
        warm_s = time.perf_counter() - t0
        times = step_times(bench, args.exact_steps, carry_s)
        exact_s = times["subset_clip_s"] + (full - args.exact_steps) * times["guided_step_s"]
        emit({
            "precision": precision, "preset": "exact", "seconds_per_clip": exact_s, "forwards": 2 * full,
            "how": f"extrapolated: a {args.exact_steps}-step clip + {full - args.exact_steps} x the median step",
            "warmup_s": warm_s, **times,
        })  # fmt: skip
        for name in ("balanced", "fast"):
            config = PRESETS[name]
            whole = precision == dense or args.fp8_whole
            if whole and not over_budget(f"{precision} {name}", NEED_S[name]):
                measured = bench.clip(config, steps=full)
                measured["seconds"] += carry_s
                logs.setdefault(name, measured["log"])
                model_s = modelled(measured["log"], times["guided_step_s"], times["cond_step_s"], times["other_s"])
                emit({
                    "precision": precision, "preset": name, "seconds_per_clip": measured["seconds"],
                    "forwards": measured["forwards"], "steps": len(measured["log"].computed),
                    "steps_computed": sum(measured["log"].computed), "how": "measured: one whole clip",
                    "model_s": model_s,
                })  # fmt: skip
            elif name in logs:
                log = logs[name]
                runs = zip(log.guided, log.computed, strict=True)
                emit({
                    "precision": precision, "preset": name,
                    "seconds_per_clip": modelled(log, times["guided_step_s"], times["cond_step_s"], times["other_s"]),
                    "forwards": sum(2 if g else 1 for g, run in runs if run), "steps": len(log.computed),
                    "steps_computed": sum(log.computed),
                    "how": f"derived: the {dense} run's step log at this precision's step times",
                })  # fmt: skip
    summary = summarise(results, full_size)
    print(json.dumps({"summary": summary}), flush=True)
    return {**info, "results": results, "summary": summary, "total_s": round(time.perf_counter() - started, 1)}


def summarise(results: list[dict], full_size: bool) -> dict:
    """Per precision: seconds, passes, speed-up against exact and the #18 target of each preset
    (met: None off the 480p 80-frame clip the targets are for)."""
    out: dict = {}
    for row in results:
        if "preset" not in row:
            continue
        prec = out.setdefault(row["precision"], {})
        prec[row["preset"]] = {"seconds_per_clip": row["seconds_per_clip"], "forwards": row["forwards"]}
    for prec in out.values():
        exact = prec.get("exact", {}).get("seconds_per_clip")
        for name, row in prec.items():
            row["speedup"] = round(exact / row["seconds_per_clip"], 2) if exact else None
            row["target_s"] = TARGETS_S[name]
            row["met"] = row["seconds_per_clip"] <= TARGETS_S[name] if full_size else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configuration on the CPU (the same code, seconds)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--exact-steps", type=int, default=4, help="steps of the timed exact clip (extrapolated)")
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--fp8-whole", action="store_true", help="run fp8 balanced and fast whole (~3 min more)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--budget-s", type=float, default=470, help="skip a stage that would end after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.tiny:
        args.height, args.width, args.frames = 64, 64, 8
        args.device = args.device or "cpu"
    args.device = args.device or "cuda"
    if args.exact_steps < 2:
        parser.error("--exact-steps must be at least 2 (the step time is a median of the steps after the first)")
    doc = run(args)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    table(doc)


def table(doc: dict) -> None:
    print(f"\n{doc['device']}, torch {doc['torch']}, {doc['attention']}, {doc['size'][0]}x{doc['size'][1]}, "
          f"{doc['frames']} frames, {doc['clip']}")  # fmt: skip
    print("| precision | preset | s / clip | DiT passes | vs exact | target | how |")
    print("|---|---|---|---|---|---|---|")
    for row in doc["results"]:
        if "preset" not in row:
            print(f"| skipped: {row['skipped']} ({row['reason']}) |")
            continue
        s = doc["summary"][row["precision"]][row["preset"]]
        met = {True: "met", False: "not met", None: "n/a at this size"}[s["met"]]
        print(f"| {row['precision']} | {row['preset']} | {row['seconds_per_clip']:.1f} | {row['forwards']} "
              f"| {s['speedup']}x | <= {s['target_s']:.0f} s: {met} | {row['how']} |")  # fmt: skip
    print(f"\n{doc['note']}")


if __name__ == "__main__":
    main()
