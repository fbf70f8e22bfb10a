"""GPU-seconds per 80 frames and per finished video-minute of 480p, distilled mode against exact
mode, and the memory peak of distilled mode with and without block streaming (issue 20, item 4).

Every component at its released size with random weights, built on the GPU as
bench/pipeline_memory.py builds them (the 14B DiT on the meta device filled on the GPU, umT5-xxl,
wav2vec2-large, the Wan2.1 VAE); nothing is read or downloaded. LiveAvatar's LoRA is not merged:
merged into the weights it costs nothing per forward, and random weights say nothing about how the
video looks anyway (see docs/benchmarks.md). Both modes run through the product's pipelines, the
same components, in one process, in this order:

- exact: `S2VPipeline`, everything resident, CFG as a batch of 2, one segment of 2 clips of 80
  frames with `--exact-steps` UniPC steps; the 40-step clip is extrapolated from the later clip as
  clip - steps * step + 40 * step (pipeline_memory.run_mode): only a few steps are timed;
- distilled-resident: `DistilledPipeline` with everything on the GPU, one segment of `--clips`
  clips of 48 frames (4 blocks of 3 latent frames, 4 Euler steps each, pipelined across blocks),
  if its KV cache fits (at 480x832 it needs 60 GiB next to the 41 GiB of resident DiT and umT5: an
  H100 refuses it before allocating, and that refusal is the row's result);
- distilled-streamed: the same with the DiT's blocks streamed from host memory (offload="blocks");
- distilled-streamed-sequential: block by block (LiveAvatar's single-GPU order), no pipelining.

Per distilled run: the reference's encode (73 x 5 frames, timed once), the segment's other fixed
seconds (text and audio encoding, the condition pass) and each clip's seconds (a clip's seconds
include the work on the next clip's first blocks that the pipeline overlaps with it; the first
clip fills the pipeline, the last drains it), the memory peak per clip. Derived: seconds per 80
frames from a middle clip (steady state) x 80 / 48; GPU-minutes per finished video-minute from
the steady clip x 20 clips plus, once per minute, a segment's fixed seconds (reference encode
included) and its fill and drain (segments of `--segment-s`, the planner's default longest 60 s).

    python bench/distilled_speed.py --json distilled.json          # on CUDA: about 3 minutes on an H100
    python bench/distilled_speed.py --tiny                         # CPU smoke test, same code
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from model.attention import fa4_unavailable
from model.audio_encoder import SAMPLE_RATE
from model.causal import CausalS2V
from model.distilled import DistilledPipeline
from model.pipeline import S2VPipeline
from model.presets import DISTILLED_INFER_FRAMES, DISTILLED_STEPS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_memory import GIB, add_machine_arguments, build_pipeline, mem, run_mode  # noqa: E402  (full-size random components)

MODES = {  # name: (offload, pipelined, compiled)
    "distilled-resident": ("none", True, False),
    "distilled-streamed": ("blocks", True, False),
    "distilled-streamed-sequential": ("blocks", False, False),
    "distilled-streamed-compiled": ("blocks", True, True),
    "distilled-resident-compiled": ("none", True, True),
}
PROMPT = "a person talks to the camera"
PROFILED = {"cuda": torch.profiler.ProfilerActivity.CUDA, "cpu": torch.profiler.ProfilerActivity.CPU}
EXACT_FRAMES = 80
VIDEO_FPS = 16


def run_distilled(
    pipe: DistilledPipeline, args, device: torch.device, label: str, pipelined: bool, warmup: bool = False
) -> dict:
    """One segment of args.clips distilled clips; fixed seconds, per-clip seconds and memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rng = np.random.default_rng(args.seed)
    image = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    audio_s = args.clips * args.distilled_frames / VIDEO_FPS + 0.5
    audio = (0.1 * rng.standard_normal(int(audio_s * SAMPLE_RATE))).astype(np.float32)
    result = {"mode": label, "resident_before": mem(device), "clips": []}
    if pipe._reference is None:  # timed apart: later runs share it (one image), every segment pays it
        vae = pipe._use(pipe.vae)
        started = time.perf_counter()
        ref, motion = pipe.reference_latents(image)
        pipe._sync()
        result["reference_seconds"] = time.perf_counter() - started
        result["reference_chunks"] = [pipe.vae.still_chunks, motion.shape[2]]  # run, of
        if args.reference_both:  # the whole 365-frame encode it replaces, for time and equality
            pixels = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0) * 2 - 1
            frames = pixels[None, :, None].expand(1, 3, 5 * pipe.config.motion_frames, *pixels.shape[1:])
            started = time.perf_counter()
            whole = pipe.vae.encode(frames.contiguous().to(device))
            pipe._sync()
            result["reference_whole_seconds"] = time.perf_counter() - started
            result["reference_whole_equal"] = bool(torch.equal(whole, motion))
            del whole
        pipe._release(vae)
    started = time.perf_counter()  # umT5 once per prompt per worker: later segments find it kept
    pipe._text_contexts([PROMPT])
    pipe._sync()
    result["text_seconds"] = time.perf_counter() - started
    if warmup:  # compiles every layout (fill, steady, drain) before the timed segment
        started = time.perf_counter()
        for _ in pipe.generate_clips(image, audio, PROMPT, num_clips=2, infer_frames=args.distilled_frames,
                                     seed=args.seed, pipelined=pipelined):  # fmt: skip
            pass
        result["warmup_seconds"] = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    profiler = None
    started = time.perf_counter()
    clips = pipe.generate_clips(
        image, audio, PROMPT, num_clips=args.clips, infer_frames=args.distilled_frames,
        seed=args.seed, pipelined=pipelined,
    )  # fmt: skip
    try:
        for out in clips:
            row = {"clip": out.index, "frames": int(out.frames.shape[0]), "seconds": out.seconds, **mem(device)}
            if out.index == 0:
                result["fixed_seconds"] = time.perf_counter() - started - out.seconds
            result["clips"].append(row)
            print(json.dumps({"mode": label, **row}), flush=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if profiler is not None:  # the steady clip 1 is profiled
                profiler.stop()
                result["profile"] = profile_table(profiler)
                profiler = None
            elif args.profile and out.index == 0:
                profiler = torch.profiler.profile(activities=[PROFILED[device.type]])
                profiler.start()
    except torch.OutOfMemoryError as exc:
        result["error"] = f"out of memory: {str(exc).splitlines()[0]}"
        print(json.dumps({"mode": label, "error": result["error"]}), flush=True)
    return result


def decode_variants(vae, device: torch.device, lat_h: int, lat_w: int, latents: int = 15) -> list[dict]:
    """Seconds of one clip's decode (15 latents: 3 of context + 12) as the pipeline runs it (float32,
    cuDNN's default algorithms) and with cuDNN's autotuner and in bf16, for what they would save and
    how far their pixels move (max abs in [-1, 1]). Measurement only: the pipeline keeps the first."""
    z = torch.randn(1, 16, latents, lat_h, lat_w, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    reference = None

    def timed(label: str, run) -> None:
        nonlocal reference
        run()  # warm-up (and the autotuner's search)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row = {"decode": label, "seconds": time.perf_counter() - started}
        if reference is None:
            reference = out.float()
        else:
            row["max_abs_vs_default"] = (out.float() - reference).abs().max().item()
        rows.append(row)
        print(json.dumps(row), flush=True)

    timed("float32", lambda: vae.decode(z))
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        timed("float32, cudnn.benchmark", lambda: vae.decode(z))
    finally:
        torch.backends.cudnn.benchmark = benchmark
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            timed("bf16 autocast", lambda: vae.decode(z))
    return rows


def profile_table(profiler: torch.profiler.profile, top: int = 25) -> list[dict]:
    """GPU time of the costliest kernels of a profiled clip, in ms (with their share of the total)."""
    events = list(profiler.key_averages())
    cuda = any(e.self_device_time_total > 0 for e in events)
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(self_us(e) for e in events) or 1.0
    events.sort(key=self_us, reverse=True)
    return [
        {"kernel": e.key[:120], "ms": self_us(e) / 1e3, "share": self_us(e) / total, "calls": e.count}
        for e in events[:top]
    ] + [{"kernel": "TOTAL", "ms": total / 1e3, "share": 1.0, "calls": 0}]  # fmt: skip


def distilled_figures(res: dict, args, reference_s: float) -> dict:
    """Seconds per 80 frames (steady clip) and GPU-minutes per video-minute of a distilled run;
    reference_s: the reference encode, which each segment pays (its row's first on a worker)."""
    clips = [c["seconds"] for c in res["clips"]]
    if len(clips) < 3:
        return {}
    steady = float(np.mean(clips[1:-1]))  # the first fills the pipeline, the last drains it
    per_minute_clips = 60 * VIDEO_FPS / args.distilled_frames
    # the prompt's umT5 encode is not counted: a worker keeps the embeddings of its last prompts
    overhead = reference_s + res["fixed_seconds"] + (clips[0] - steady) + (clips[-1] - steady)
    per_minute = steady * per_minute_clips + overhead * 60 / args.segment_s
    return {
        "steady_clip_seconds": steady,
        "seconds_per_80_frames": steady * EXACT_FRAMES / args.distilled_frames,
        "segment_overhead_seconds": overhead,
        "gpu_minutes_per_video_minute": per_minute / 60,
        "dit_forwards_per_clip": (args.distilled_frames // 12) * DISTILLED_STEPS,
    }


def exact_figures(res: dict) -> dict:
    later = [c for c in res["clips"] if c["clip"] >= 1] or res["clips"]
    if not later:
        return {}
    per_clip = later[0]["clip_40_steps_seconds"]
    return {
        "seconds_per_80_frames": per_clip,
        "gpu_minutes_per_video_minute": per_clip * (60 * VIDEO_FPS / EXACT_FRAMES) / 60,
        "dit_forwards_per_clip": 40,  # each a CFG batch of 2
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_machine_arguments(parser)
    parser.add_argument("--clips", type=int, default=3, help="distilled clips per segment (>= 3: fill, steady, drain)")
    parser.add_argument("--exact-steps", type=int, default=2, help="UniPC steps timed per exact clip (of 40)")
    parser.add_argument("--segment-s", type=float, default=60.0, help="segment length for the per-minute figure")
    parser.add_argument("--modes", default="exact," + ",".join(MODES), help="modes to run, in order")
    parser.add_argument("--attention", choices=["auto", "sdpa", "fa4"], default="auto",
                        help="the self-attention kernel of both modes (auto: fa4 where it runs)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reference-both",
        action="store_true",
        help="also time the whole 365-frame reference encode that encode_still replaces",
    )
    parser.add_argument("--profile", action="store_true", help="GPU kernel profile of each mode's clip 1")
    parser.add_argument("--decode-variants", action="store_true", help="time a clip's decode three ways first")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.distilled_frames = DISTILLED_INFER_FRAMES
    exact_frames = EXACT_FRAMES
    if args.tiny and args.height == 480:
        args.height, args.width, args.distilled_frames, exact_frames = 64, 64, 24, 8
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    info = {"torch": torch.__version__, "device": name}
    if device.type == "cuda":
        info["gpu_gib"] = torch.cuda.get_device_properties(device).total_memory / GIB
    started = time.perf_counter()
    base = build_pipeline(SimpleNamespace(tiny=args.tiny, seed=args.seed), device)
    attention = args.attention
    if attention == "auto":
        attention = "sdpa" if fa4_unavailable(device) else "fa4"
    base.transformer.set_attention(attention, device)
    info |= {"attention": attention, "built_seconds": time.perf_counter() - started}
    print(json.dumps(info | mem(device)), flush=True)
    lat_h, lat_w = args.height // 8, args.width // 8
    info["kv_cache_gib"] = (
        CausalS2V(base.transformer).cache_bytes(steps=DISTILLED_STEPS, window=args.distilled_frames // 12,
                                                lat_h=lat_h, lat_w=lat_w) / GIB
    )  # fmt: skip
    results: list[dict] = []
    if args.decode_variants:
        info["decode"] = decode_variants(base.vae, device, lat_h, lat_w)
    reference, reference_s = None, 0.0  # the 365-frame reference encode, once for the distilled runs

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps({**info, "args": {k: str(v) for k, v in vars(args).items()},
                                             "results": results}))  # fmt: skip

    for mode in [m for m in args.modes.split(",") if m]:
        if mode == "exact":
            pipe = S2VPipeline(base.transformer, base.text_encoder, base.audio_encoder, base.vae, device=device)
            spec = SimpleNamespace(clips=2, frames=exact_frames, steps=args.exact_steps, height=args.height,
                                   width=args.width, seed=args.seed)  # fmt: skip
            res = run_mode(pipe, spec, device, "exact")
            res["figures"] = exact_figures(res)
        else:
            offload, pipelined, compiled = MODES[mode]
            if compiled:  # as a worker has them on CUDA; stays compiled for the modes after this one
                base.transformer.compile_blocks(dynamic=False)
            pipe = DistilledPipeline(base.transformer, base.text_encoder, base.audio_encoder, base.vae,
                                     device=device, offload=offload)  # fmt: skip
            pipe._reference = reference  # the components are shared, so is their reference encode
            res = run_distilled(pipe, args, device, mode, pipelined, warmup=compiled)
            reference, reference_s = pipe._reference, res.get("reference_seconds", reference_s)
            res["figures"] = distilled_figures(res, args, reference_s)
        print(json.dumps({"mode": mode, **res.get("figures", {})}), flush=True)
        results.append(res)
        save()

    print(f"\n{info['device']}, torch {info['torch']}, {args.height}x{args.width}, attention {attention}, "
          f"KV cache {info['kv_cache_gib']:.1f} GiB")  # fmt: skip
    print("| mode | s / 80 frames | GPU-min / video-min | DiT forwards / clip | peak alloc GiB | note |")
    print("|---|---|---|---|---|---|")
    for res in results:
        fig = res.get("figures", {})
        peak = max((c.get("peak_allocated_gib", float("nan")) for c in res["clips"]), default=float("nan"))
        note = res.get("error", "")
        if res["mode"] == "exact":
            note = note or f"40 steps extrapolated from {args.exact_steps}"
        print(f"| {res['mode']} | {fig.get('seconds_per_80_frames', float('nan')):.1f} "
              f"| {fig.get('gpu_minutes_per_video_minute', float('nan')):.2f} | {fig.get('dit_forwards_per_clip', '')} "
              f"| {peak:.1f} | {note} |")  # fmt: skip


if __name__ == "__main__":
    main()
