"""Speed of the S2V transformer forward on one GPU (issue 4, item 6), side by side in one run with
(a) the floor: the forward's FLOPs over the bf16 matmul rate measured in the same run, and
(b) DiffSynth-Studio's DiT with the same random bf16 weights (shared tensors) and inputs.

    PYTHONPATH=. python bench/dit_speed.py                      # full 14B, 480p + 720p, on CUDA
    PYTHONPATH=. python bench/dit_speed.py --config tiny --device cpu --sizes 64x64 --frames 8

Scenarios: a first clip (no motion tokens) and a later clip (FramePack motion tokens) at
480x832 and 720x1280 with 80 frames (20 latent frames), batch 1, and both CFG branches as one
batch of 2 (the sampler's step). Reported: median ms per forward (CUDA events), peak memory,
achieved TFLOP/s, the floor, and the 40-step CFG clip estimate (40 x the CFG step). Our model runs
with its blocks under torch.compile (--no-compile for eager); DiffSynth runs as it ships (eager),
with the same SDPA backend priority (cuDNN first) so attention kernels are alike.
The 14B is built on the meta device and materialised on the GPU with random values (seconds).
DiffSynth needs `pip install --no-deps diffsynth==2.1.12` (see bench/parity_diffsynth.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from torch.nn.attention import SDPBackend

from model import attention, transformer
from model.attention import attention_backends
from model.config import S2VConfig
from model.transformer import WanS2VTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent))


# ---------------------------------------------------------------------------------------------
# FLOPs


def forward_flops(cfg: S2VConfig, frames: int, lat_h: int, lat_w: int, motion: bool, batch: int = 1) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward: all matmuls, attention, convolutions."""
    p = cfg.patch_size
    f, h, w = frames // p[0], lat_h // p[1], lat_w // p[2]
    d, L = cfg.dim, cfg.text_len
    n_vid, n_ref = f * h * w, h * w
    n_mot = 0
    if motion:
        n_mot = (lat_h // 2) * (lat_w // 2) + (lat_h // 4) * (lat_w // 4) + 4 * (lat_h // 8) * (lat_w // 8)
    s = n_vid + n_ref + n_mot
    per_block = (
        4 * 2 * s * d * d  # self-attention q, k, v, o
        + 4 * s * s * d  # QK^T and PV
        + 2 * 2 * s * d * d  # cross-attention q, o
        + 2 * 2 * L * d * d  # cross-attention k, v on the text
        + 4 * s * L * d  # cross-attention scores and values
        + 2 * 2 * s * d * cfg.ffn_dim  # feed-forward
    )
    n_audio = cfg.num_audio_token + 1
    per_injection = 2 * 2 * n_vid * d * d + 2 * 2 * f * n_audio * d * d + 4 * n_vid * n_audio * d
    embed = 2 * (n_vid + n_ref) * d * cfg.in_dim * math.prod(p) + 2 * n_vid * d * cfg.cond_dim * math.prod(p)
    embed += 2 * L * (cfg.text_dim * d + d * d)
    head = 2 * n_vid * d * cfg.out_dim * math.prod(p)
    total = cfg.num_layers * per_block + len(cfg.audio_inject_layers) * per_injection + embed + head
    return float(batch * total)


def sequence_length(cfg: S2VConfig, frames: int, lat_h: int, lat_w: int, motion: bool) -> int:
    f, h, w = frames, lat_h // 2, lat_w // 2
    mot = (lat_h // 2) * (lat_w // 2) + (lat_h // 4) * (lat_w // 4) + 4 * (lat_h // 8) * (lat_w // 8)
    return f * h * w + h * w + (mot if motion else 0)


# ---------------------------------------------------------------------------------------------
# timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return times


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """bf16 matrix-product rate on random data (median of 10 after 3 warm-ups), TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = statistics.median(time_ms(lambda: a @ b, device, repeats=10, warmup=3))
    return 2 * n**3 / (ms / 1000) / 1e12


# ---------------------------------------------------------------------------------------------
# models


@torch.no_grad()
def build_ours(cfg: S2VConfig, device: torch.device, dtype: torch.dtype, seed: int) -> WanS2VTransformer:
    """The model on `device` with random weights, without a CPU copy or a second init."""
    with torch.device("meta"):
        model = WanS2VTransformer(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "casual_audio_encoder.weights":
            p.uniform_(0.5, 1.5, generator=gen)
        elif name.endswith("modulation"):
            p.normal_(0, 1 / math.sqrt(cfg.dim), generator=gen)
        elif p.ndim == 1 and ("norm" in name):
            p.normal_(1.0, 0.05, generator=gen)
        elif p.ndim >= 2:
            p.normal_(0, 1 / math.sqrt(p[0].numel()), generator=gen)
        else:
            p.normal_(0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def build_diffsynth(cfg: S2VConfig, ours: WanS2VTransformer):
    """DiffSynth's WanS2VModel sharing our weight tensors (assign=True: no extra memory)."""
    from parity_diffsynth import build_diffsynth as construct
    from parity_diffsynth import import_diffsynth_s2v

    ds = import_diffsynth_s2v()
    for name, module in list(sys.modules.items()):  # FA4's `flash_attn` package is not FlashAttention-2
        fa2 = "diffsynth" in name and getattr(module, "FLASH_ATTN_2_AVAILABLE", None) is True
        if fa2 and not hasattr(getattr(module, "flash_attn", None), "flash_attn_func"):
            module.FLASH_ATTN_2_AVAILABLE = False
    with torch.device("meta"):
        dit = construct(ds, cfg)
    dit.load_state_dict(ours.state_dict(), strict=True, assign=True)
    # tensors DiffSynth computes at construction (plain attributes, on CPU as in its own init)
    head_dim = cfg.dim // cfg.num_heads
    dit.freqs = torch.cat(ds.precompute_freqs_cis_3d(head_dim), dim=1)
    dit.frame_packer.freqs = torch.cat(ds.precompute_freqs_cis_3d(head_dim), dim=1)
    dit.frame_packer.zip_frame_buckets = torch.tensor([1, 2, 16], dtype=torch.long)
    return ds, dit.eval().requires_grad_(False)


def make_inputs(cfg: S2VConfig, lat_h: int, lat_w: int, frames: int, batch: int, device, dtype, seed: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    return {
        "latents": rnd(batch, cfg.in_dim, frames, lat_h, lat_w),
        "timestep": torch.full((batch,), 936.0, device=device),  # exact in bf16 (DiffSynth casts it)
        "context": rnd(batch, cfg.text_len, cfg.text_dim),
        "ref_latents": rnd(1, cfg.in_dim, 1, lat_h, lat_w),
        "audio": rnd(batch, cfg.audio_num_layers, cfg.audio_dim, 4 * frames),
        "motion_latents": rnd(1, cfg.in_dim, cfg.lat_motion_frames, lat_h, lat_w),
    }


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["wan14b", "tiny"], default="wan14b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="480x832,720x1280", help="pixel HxW list")
    parser.add_argument("--frames", type=int, default=80, help="video frames per clip")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-diffsynth", action="store_true")
    parser.add_argument("--eager-too", action="store_true", help="also time our eager forward (480p first clip)")
    parser.add_argument("--budget-s", type=float, default=520, help="skip remaining scenarios after this")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--profile", action="store_true", help="kernel-time breakdown of one forward")
    parser.add_argument(
        "--precision-check",
        type=int,
        default=0,
        metavar="LAYERS",
        help="bf16 error of ours and DiffSynth vs an fp32 forward, on a 14B-width model of LAYERS",
    )
    parser.add_argument("--fp8", action="store_true", help="also time ours with fp8 block linears (first size)")
    parser.add_argument("--skip-main", action="store_true", help="only the extras above")
    parser.add_argument("--main-sizes", default=None, help="sizes of the main table (default: --sizes)")
    parser.add_argument("--fp8-cfg", action="store_true", help="with --fp8: also the CFG step and later clip")
    parser.add_argument("--sdpa", choices=["cudnn", "flash"], default="cudnn", help="preferred attention kernel")
    parser.add_argument("--fa4", action="store_true", help="also time ours with FA4 self-attention (first size)")
    parser.add_argument("--gelu-ablation", action="store_true", help="with --fa4: first the GELU as a separate pass")
    args = parser.parse_args()

    t_start = time.time()
    if args.sdpa == "flash":
        attention.SDPA_PRIORITY.remove(SDPBackend.CUDNN_ATTENTION)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = S2VConfig.wan_14b() if args.config == "wan14b" else S2VConfig.tiny()
    frames = cfg.latent_frames(args.frames)
    results: dict = {"config": args.config, "frames": args.frames, "latent_frames": frames, "rows": []}
    results["sdpa_priority"] = [b.name for b in attention.SDPA_PRIORITY]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        results["gpu"] = props.name
        results["torch"] = torch.__version__
        results["cudnn"] = torch.backends.cudnn.version()
        rate = matmul_tflops(device, dtype, 8192)
    else:
        results["gpu"] = "cpu"
        rate = matmul_tflops(device, dtype, 1024)
    results["matmul_tflops"] = rate
    print(f"device {results['gpu']}  torch {torch.__version__}  bf16 matmul {rate:.0f} TFLOP/s", flush=True)

    if args.precision_check:
        results["precision"] = precision_check(cfg, args.precision_check, device, sizes_of(args)[0], args.frames)
        print(f"precision vs fp32: {json.dumps(results['precision'])}", flush=True)

    ours = build_ours(cfg, device, dtype, seed=0)
    weights_gb = sum(p.numel() * p.element_size() for p in ours.parameters()) / 1e9
    results["weights_gb"] = weights_gb
    print(f"built the model on {device}: {weights_gb:.1f} GB of weights ({time.time() - t_start:.0f} s)", flush=True)
    ds = dit = None
    if not args.no_diffsynth:
        try:
            ds, dit = build_diffsynth(cfg, ours)
        except Exception as exc:  # report and go on without the comparison
            print(f"DiffSynth unavailable: {exc!r}", flush=True)
            results["diffsynth_error"] = repr(exc)

    def record(impl: str, label: str, size: tuple, motion: bool, batch: int, times: list[float], peak: float) -> dict:
        lat_h, lat_w = size[0] // 8, size[1] // 8
        flops = forward_flops(cfg, frames, lat_h, lat_w, motion, batch)
        ms = statistics.median(times)
        row = {
            "impl": impl,
            "scenario": label,
            "size": f"{size[0]}x{size[1]}",
            "batch": batch,
            "tokens": sequence_length(cfg, frames, lat_h, lat_w, motion),
            "ms": ms,
            "ms_all": times,
            "tflop": flops / 1e12,
            "tflops_achieved": flops / (ms / 1000) / 1e12,
            "floor_ms": flops / (rate * 1e12) * 1000,
            "x_floor": ms / (flops / (rate * 1e12) * 1000),
            "peak_gb": peak,
        }
        results["rows"].append(row)
        print(
            f"{impl:9s} {label:12s} {row['size']:9s} B={batch} tokens={row['tokens']:6d}  {ms:9.1f} ms  "
            f"{row['tflops_achieved']:5.0f} TFLOP/s  floor {row['floor_ms']:8.1f} ms  x{row['x_floor']:.2f}  "
            f"peak {peak:5.1f} GB",
            flush=True,
        )
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "dit_speed.json").write_text(json.dumps(results, indent=2))
        return row

    def run(impl: str, fn, label, size, motion, batch, repeats: int | None = None) -> dict | None:
        if time.time() - t_start > args.budget_s:
            print(f"skipped {impl} {label} {size}: over the time budget", flush=True)
            return None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            times = time_ms(fn, device, repeats or args.repeats, args.warmup)
        except torch.OutOfMemoryError as exc:
            print(f"{impl} {label} {size}: out of memory ({exc})", flush=True)
            return None
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
        return record(impl, label, size, motion, batch, times, peak)

    sizes = sizes_of(args)
    with torch.no_grad():
        first = sizes[0]
        lat = (first[0] // 8, first[1] // 8)
        one = make_inputs(cfg, *lat, frames, 1, device, dtype, seed=1)
        if args.main_sizes:
            sizes = [tuple(int(v) for v in s.split("x")) for s in args.main_sizes.split(",")]
        if args.skip_main:
            sizes = []
        if args.eager_too:
            run("ours-eager", lambda: ours(**one, drop_motion_frames=True), "first clip", first, False, 1)
        # a check that both implementations compute the same function on these weights
        if dit is not None:
            a = ours(**one, drop_motion_frames=True).float()
            b = _diffsynth_call(ds, dit, one, drop=True).float()
            results["bf16_rel_diff_vs_diffsynth"] = ((a - b).norm() / b.norm()).item()
            print(f"ours vs DiffSynth, bf16, 480p first clip: rel L2 {results['bf16_rel_diff_vs_diffsynth']:.2e}")
            del a, b
        if not args.no_compile:
            torch._dynamo.config.cache_size_limit = 32
            ours.compile_blocks(dynamic=False)
        impl = "ours" if args.no_compile else "ours+comp"
        if device.type == "cuda":  # no host synchronisation inside a forward (after warm-up)
            ours(**one, drop_motion_frames=True)
            torch.cuda.set_sync_debug_mode("error")
            try:
                ours(**one, drop_motion_frames=True)
                results["host_syncs"] = "none"
            except RuntimeError as exc:
                results["host_syncs"] = str(exc).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode("default")
            print(f"host synchronisations in a forward: {results['host_syncs']}", flush=True)
        if args.profile:
            results["profile"] = profile_forward(lambda: ours(**one, drop_motion_frames=True), device)
        for size in sizes:
            lat = (size[0] // 8, size[1] // 8)
            one = two = None  # free the previous size's inputs first
            one = make_inputs(cfg, *lat, frames, 1, device, dtype, seed=1)
            big = size[0] > 480
            reps = max(2, args.repeats - 1) if big else args.repeats  # 720p forwards take 3x longer
            run(impl, lambda one=one: ours(**one, drop_motion_frames=True), "first clip", size, False, 1, reps)
            if dit is not None:
                call = lambda one=one: _diffsynth_call(ds, dit, one, drop=True)  # noqa: E731
                run("diffsynth", call, "first clip", size, False, 1, reps)
            run(impl, lambda one=one: ours(**one), "later clip", size, True, 1, reps)
            if dit is not None and not big:
                run("diffsynth", lambda one=one: _diffsynth_call(ds, dit, one, drop=False), "later clip", size, True, 1)
            if not big:
                two = make_inputs(cfg, *lat, frames, 2, device, dtype, seed=2)
                run(impl, lambda two=two: ours(**two, drop_motion_frames=True), "CFG step", size, False, 2)

        def variant(name: str, change, key: str, all_scenarios: bool = True, profile: bool = False) -> bool:
            """Apply `change` to our model (in place), record its relative L2 against the forward
            before it under `key`, and time it at the first size; False if it cannot run here."""
            size = sizes_of(args)[0]
            lat = (size[0] // 8, size[1] // 8)
            one = make_inputs(cfg, *lat, frames, 1, device, dtype, seed=1)
            ref = ours(**one, drop_motion_frames=True).float()
            try:
                change()
            except ValueError as exc:
                print(f"{name} unavailable: {exc}", flush=True)
                results[f"{key}_error"] = str(exc)
                return False
            got = ours(**one, drop_motion_frames=True).float()
            results[key] = ((got - ref).norm() / ref.norm()).item()
            print(f"{name}: {key} {results[key]:.2e}", flush=True)
            del ref, got
            if profile:
                results[f"profile_{key}"] = profile_forward(lambda: ours(**one, drop_motion_frames=True), device)
            label = f"{impl}+{name}"
            run(label, lambda: ours(**one, drop_motion_frames=True), "first clip", size, False, 1)
            if all_scenarios:
                run(label, lambda: ours(**one), "later clip", size, True, 1)
                two = make_inputs(cfg, *lat, frames, 2, device, dtype, seed=2)
                run(label, lambda: ours(**two, drop_motion_frames=True), "CFG step", size, False, 2)
            return True

        if args.fa4:
            impl = fa4_variants(ours, args, variant, impl)
        if args.fp8:
            from model.checkpoint import quantize_linears_fp8

            variant("fp8", lambda: quantize_linears_fp8(ours), "fp8_rel_diff_vs_bf16", all_scenarios=args.fp8_cfg)

    _summary(results)
    print(f"total {time.time() - t_start:.0f} s", flush=True)


def fa4_variants(ours: WanS2VTransformer, args, variant, impl: str) -> str:
    """After the SDPA rows: the feed-forward with its GELU as a separate pass (first clip; the
    cuBLASLt epilogue that replaces it is the default), then FA4 self-attention, timed in all
    scenarios (and profiled with --profile). Returns the label for the rows after it."""

    def gelu_separate() -> None:
        transformer.FFN_GELU_EPILOGUE = False

    def fa4() -> None:
        transformer.FFN_GELU_EPILOGUE = True
        ours.set_attention("fa4")

    if args.gelu_ablation:
        variant("gelu-separate", gelu_separate, "gelu_separate_rel_diff_vs_epilogue", all_scenarios=False)
    if variant("fa4", fa4, "fa4_rel_diff_vs_sdpa", profile=args.profile):
        impl += "+fa4"
    return impl


def sizes_of(args) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]


def profile_forward(fn, device: torch.device) -> dict:
    """GPU kernel time of one call by kind (matmul, attention, fused/elementwise), top kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    kinds: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = evt.name
        ms = evt.device_time / 1000 if hasattr(evt, "device_time") else evt.cuda_time / 1000
        low = name.lower()
        if any(k in low for k in ("fmha", "flash", "cudnn", "attention", "sdpa")):
            kind = "attention"
        elif any(k in low for k in ("gemm", "nvjet", "xmma", "cutlass", "matmul", "sm90")):
            kind = "matmul"
        elif "triton" in low:
            kind = "fused (triton)"
        else:
            kind = "other"
        kinds[kind] = kinds.get(kind, 0.0) + ms
        kernels[name[:90]] = kernels.get(name[:90], 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    print("kernel time by kind (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(kinds.items())), flush=True)
    for name, ms in top:
        print(f"  {ms:8.1f} ms  {name}", flush=True)
    return {"by_kind_ms": kinds, "top": top}


@torch.no_grad()
def precision_check(cfg14: S2VConfig, layers: int, device, size, video_frames: int) -> dict:
    """Relative L2 error of the bf16 forwards (ours, DiffSynth) against an fp32 forward with the
    same (bf16-representable) weights and inputs, on a 14B-width model with `layers` blocks."""
    import dataclasses

    cfg = dataclasses.replace(cfg14, num_layers=layers, audio_inject_layers=(0, layers - 1))
    low = build_ours(cfg, device, torch.bfloat16, seed=3)
    with torch.device("meta"):
        ref = WanS2VTransformer(cfg)
    ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()}, assign=True)
    ref.eval()
    frames = cfg.latent_frames(video_frames)
    inputs = make_inputs(cfg, size[0] // 8, size[1] // 8, frames, 1, device, torch.bfloat16, seed=4)
    inputs["timestep"] = torch.full((1,), 936.0, device=device)  # exact in bf16 (DiffSynth casts it)
    out = {}
    try:
        ds, dit = build_diffsynth(cfg, low)
    except Exception:
        ds = dit = None
    for label, drop in (("first", True), ("later", False)):
        want = ref(**{k: v.float() for k, v in inputs.items()}, drop_motion_frames=drop)
        got = low(**inputs, drop_motion_frames=drop).float()
        out[f"ours_bf16_{label}"] = ((got - want).norm() / want.norm()).item()
        if dit is not None:
            theirs = _diffsynth_call(ds, dit, inputs, drop=drop).float()
            out[f"diffsynth_bf16_{label}"] = ((theirs - want).norm() / want.norm()).item()
    del low, ref, dit
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _diffsynth_call(ds, dit, inputs: dict, drop: bool) -> torch.Tensor:
    from parity_diffsynth import diffsynth_forward

    lat = inputs["latents"]
    with attention_backends(lat.device):
        return diffsynth_forward(
            ds,
            dit,
            lat,
            inputs["timestep"].to(lat.dtype),
            inputs["context"],
            inputs["ref_latents"],
            inputs["audio"],
            inputs["motion_latents"],
            torch.zeros_like(lat),
            drop,
        )


def _summary(results: dict) -> None:
    rows = {(r["impl"], r["scenario"], r["size"]): r for r in results["rows"]}
    print("\nsummary")
    for (impl, scenario, size), r in rows.items():
        if impl == "diffsynth":
            continue
        ds = rows.get(("diffsynth", scenario, size))
        vs = f"  {ds['ms'] / r['ms']:.2f}x faster than DiffSynth" if ds else ""
        print(f"  {impl} {scenario} {size}: {r['ms'] / 1000:.2f} s, {r['x_floor']:.2f}x floor{vs}")
        if scenario == "CFG step":
            print(f"    40-step CFG clip estimate {40 * r['ms'] / 1000:.0f} s")
    for r in results["rows"]:
        if r["impl"] == "diffsynth" and r["scenario"] == "first clip":
            est = 80 * r["ms"] / 1000
            print(f"  DiffSynth {r['size']} 40-step CFG clip estimate (2 forwards a step) {est:.0f} s")


if __name__ == "__main__":
    main()
