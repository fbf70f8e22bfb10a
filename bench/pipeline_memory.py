"""GPU memory and time of a full S2V clip through `S2VPipeline.generate_clips`, offload off and on
(issue 4, item 6: "480p runs on one 80 GB GPU without offloading; an offload mode serves 24-48 GB
GPUs; report both").

Every component at its released size with random weights, configs built here (nothing is read or
downloaded): the 14B DiT (meta device + random bf16 init on the GPU, as bench/dit_speed.py), the
umT5-xxl encoder (5.7B, bf16), wav2vec2-large-xlsr-53 (float32) and the Wan2.1 VAE (float32). The
tokenizer is the tiny one the test checkpoint trains (prompt length does not change memory: T5
always runs on 512 padded tokens). One segment of `--clips` clips (a first clip, then a later
clip with motion latents) of 480x832 x 80 frames with `--steps` steps and CFG, once per mode
of MODES: the pipeline holding everything on the GPU ("off"), the whole-component offload
("model"), block streaming ("blocks": model/offload.py), with CFG as a batch of 2 or two passes,
VAE tiling, and the allocator capped at 22 GiB (`set_per_process_memory_fraction`) standing in
for a 24 GB GPU. Once the DiT streams its blocks, later modes in the same process stream too.
`--dit-offload` then times single DiT forwards resident, streamed and streamed + compiled, with
diffusers' block-level group offloading as a peer.

Reported per mode: resident GPU memory before generating and between clips
(torch.cuda.memory_allocated), each clip's peak (max_memory_allocated / max_memory_reserved), the
seconds of each denoising step after the first (synchronised), each clip's seconds and the
40-step clip time extrapolated as clip - steps * step + 40 * step.

    python3 bench/pipeline_memory.py                                # on CUDA: full size, five modes
    .venv/bin/python bench/pipeline_memory.py --tiny --device cpu   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from transformers import (
    AutoTokenizer,
    UMT5Config,
    UMT5EncoderModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
)

from model.audio_encoder import SAMPLE_RATE, AudioEncoder
from model.config import S2VConfig
from model.offload import block_streamer, stream_blocks
from model.pipeline import S2VPipeline
from model.text_encoder import TextEncoder
from model.tiny import TINY_VAE, _tiny_tokenizer
from model.vae import WanVAE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_speed import build_ours  # noqa: E402  (the 14B on the meta device, random weights on the GPU)

GIB = 2**30


def umt5_xxl_config(tiny: bool, text_dim: int) -> UMT5Config:
    """google/umt5-xxl's encoder (what models_t5_umt5-xxl-enc-bf16.pth holds), or a tiny one."""
    if tiny:
        return UMT5Config(vocab_size=256, d_model=text_dim, d_kv=text_dim // 2, d_ff=2 * text_dim, num_layers=2,
                          num_heads=2, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                          dropout_rate=0.0, tie_word_embeddings=False)  # fmt: skip
    return UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
                      tie_word_embeddings=False)  # fmt: skip


def wav2vec2_config(tiny: bool, hidden: int, layers: int) -> Wav2Vec2Config:
    """wav2vec2-large-xlsr-53 (stable layer norm, 24 layers of 1024), or a tiny one."""
    if tiny:
        return Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                              intermediate_size=2 * hidden, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                              num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
                              do_stable_layer_norm=True, conv_bias=True)  # fmt: skip
    return Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                          conv_dim=(512,) * 7, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
                          feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)  # fmt: skip


@torch.no_grad()
def random_t5(config: UMT5Config, device: torch.device, dtype: torch.dtype, seed: int) -> UMT5EncoderModel:
    """The encoder materialised on `device` with scaled random weights (no CPU copy of 11 GB)."""
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:  # layer norms
            p.fill_(1.0)
        elif "relative_attention_bias" in name or "shared" in name:
            p.normal_(0, 1.0, generator=gen)
        else:
            p.normal_(0, p.shape[1] ** -0.5, generator=gen)
    return model.eval()


def build_pipeline(args, device: torch.device) -> S2VPipeline:
    cfg = S2VConfig.tiny() if args.tiny else S2VConfig.wan_14b()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dit = build_ours(cfg, device, dtype, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        _tiny_tokenizer(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    text = TextEncoder(random_t5(umt5_xxl_config(args.tiny, cfg.text_dim), device, dtype, args.seed), tokenizer)
    torch.manual_seed(args.seed)
    w2v = Wav2Vec2Model(wav2vec2_config(args.tiny, cfg.audio_dim, cfg.audio_num_layers - 1))
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)  # fmt: skip
    vae = WanVAE(AutoencoderKLWan(**TINY_VAE) if args.tiny else AutoencoderKLWan(), device)
    return S2VPipeline(dit, text, AudioEncoder(w2v, extractor), vae, device=device)


def add_machine_arguments(parser: argparse.ArgumentParser) -> None:
    """--tiny, --device, --height, --width: the size and place of a full-pipeline benchmark."""
    parser.add_argument("--tiny", action="store_true", help="tiny configuration (CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)


def mem(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {
        "allocated_gib": torch.cuda.memory_allocated(device) / GIB,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
    }


def run_mode(pipe: S2VPipeline, args, device: torch.device, label: str) -> dict:
    """Generate one segment of `args.clips` clips; per-clip memory and timings."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = {"mode": label, "resident_before": mem(device), "clips": []}
    rng = np.random.default_rng(args.seed)
    image = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    seconds_audio = args.clips * args.frames / 16 + 0.5
    audio = (0.1 * rng.standard_normal(int(seconds_audio * SAMPLE_RATE))).astype(np.float32)
    stamps: list[float] = []

    def on_step(clip: int, step: int, steps: int) -> None:
        sync()
        stamps.append(time.perf_counter())

    clips = pipe.generate_clips(image, audio, "a person talks to the camera", num_clips=args.clips,
                                infer_frames=args.frames, steps=args.steps, on_step=on_step)  # fmt: skip
    for out in clips:
        step_s = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]  # steps after the first
        step = float(np.mean(step_s)) if step_s else float("nan")
        row = {
            "clip": out.index,
            "frames": int(out.frames.shape[0]),
            "seconds": out.seconds,
            "step_seconds": step_s,
            "clip_40_steps_seconds": out.seconds + (40 - args.steps) * step,
            **mem(device),
        }
        result["clips"].append(row)
        print(json.dumps({"mode": label, **row}), flush=True)
        stamps.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    return result


def h2d_gbps(device: torch.device, gib: float = 1.0) -> dict[str, float]:
    """Host-to-device copy rate from pinned and from pageable memory (median of 5), GB/s."""
    n = int(gib * GIB)
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    out = {}
    for label, src in (
        ("pinned", torch.empty(n, dtype=torch.uint8).pin_memory()),
        ("pageable", torch.empty(n, dtype=torch.uint8)),
    ):
        times = []
        for _ in range(5):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        out[label] = n / float(np.median(times)) / 1e9
    return out


def dit_inputs(cfg: S2VConfig, args, device: torch.device, batch: int) -> dict:
    """Random inputs of one first-clip DiT forward at the bench's size."""
    g = torch.Generator(device=device).manual_seed(args.seed)
    lat_f, lat_h, lat_w = cfg.latent_frames(args.frames), args.height // 8, args.width // 8
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    return {
        "latents": rnd(batch, cfg.in_dim, lat_f, lat_h, lat_w),
        "timestep": torch.full((batch,), 936.0, device=device),
        "context": rnd(batch, cfg.text_len, cfg.text_dim),
        "ref_latents": rnd(1, cfg.in_dim, 1, lat_h, lat_w),
        "audio": rnd(batch, cfg.audio_num_layers, cfg.audio_dim, args.frames),
        "drop_motion_frames": True,
    }


def time_dit(dit, inputs: dict, device: torch.device, repeats: int = 3) -> dict:
    """Median seconds of `repeats` DiT forwards after one warm-up, and their peak memory."""
    dit(**inputs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dit(**inputs)
        sync()
        times.append(time.perf_counter() - t0)
    return {"seconds": float(np.median(times)), "all": times, **mem(device)}


def dit_offload_comparison(pipe: S2VPipeline, args, device: torch.device) -> list[dict]:
    """One DiT forward (batch 1 and the CFG batch of 2) resident, streamed by our BlockStreamer
    (eager, then compiled), and streamed by diffusers' block-level group offloading (its
    CUDA-stream prefetch): the same weights and inputs. Leaves the DiT to diffusers' hooks: run
    it last."""
    dit = pipe.transformer
    rows = []
    probe = dit_inputs(dit.config, args, device, 1)
    reference = dit(**probe).float()

    def rel_diff() -> float:
        out = dit(**probe).float()
        return ((out - reference).norm() / reference.norm()).item()

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    def timed(impl: str) -> None:
        """One row per batch (1 and the CFG batch of 2) for the DiT as it is set up now."""
        for batch in (1, 2):
            inputs = dit_inputs(dit.config, args, device, batch)
            torch.cuda.empty_cache()
            record({"impl": impl, "batch": batch, **time_dit(dit, inputs, device)})

    timed("resident")
    for part in (pipe.text_encoder, pipe.audio_encoder, pipe.vae):
        part.to("cpu")
    torch.cuda.empty_cache()
    streamer = block_streamer(dit) or stream_blocks(dit, device)
    timed("ours streamed")
    record({"impl": "ours streamed", "rel_l2_vs_resident": rel_diff()})
    dit.compile_blocks(dynamic=False)
    timed("ours streamed, compiled")
    record({"impl": "ours streamed, compiled", "rel_l2_vs_resident_eager": rel_diff()})
    streamer.remove()  # the blocks stay in their pinned homes for diffusers to take over
    try:
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(dit, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=True)  # fmt: skip
        timed("diffusers group offload")
    except Exception as exc:  # report and go on
        record({"impl": "diffusers group offload", "error": repr(exc)})
    return rows


MODES = {
    # label: (offload, cfg_batch, vae_tiling, memory cap in GiB or None)
    "off": ("none", True, False, None),
    "model": ("model", False, False, None),
    "blocks": ("blocks", True, False, None),
    "blocks-2pass": ("blocks", False, False, None),
    "blocks-24g": ("blocks", True, False, 22.0),
    "blocks-24g-tiled": ("blocks", True, True, 22.0),
    "blocks-2pass-24g": ("blocks", False, False, 22.0),
    "blocks-2pass-24g-tiled": ("blocks", False, True, 22.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_machine_arguments(parser)
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--modes", default="off,model,blocks,blocks-2pass,blocks-24g",
                        help=f"pipeline modes to run, in order, from: {', '.join(MODES)}")  # fmt: skip
    parser.add_argument("--dit-offload", action="store_true",
                        help="then time one DiT forward resident / streamed by us / by diffusers")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT's blocks (as on CUDA "
                        "S2VPipeline.from_checkpoint does by default)")  # fmt: skip
    parser.add_argument("--attention", choices=["sdpa", "fa4"], default="sdpa",
                        help="the DiT's self-attention kernel ('auto' in from_checkpoint picks fa4)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.tiny and args.height == 480:
        args.height, args.width, args.frames = 64, 64, 8
    device = torch.device(args.device)
    info = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    if device.type == "cuda":
        info["h2d_gbps"] = h2d_gbps(device)
    print(json.dumps(info), flush=True)
    started = time.perf_counter()
    base = build_pipeline(args, device)
    base.transformer.set_attention(args.attention, device)
    info["attention"] = args.attention
    print(json.dumps({"built_seconds": time.perf_counter() - started, **mem(device)}), flush=True)
    results: list[dict] = []
    extra: dict = {}

    def save() -> None:
        if args.json:
            doc = {**info, "args": vars(args) | {"json": str(args.json)}, "results": results, **extra}
            args.json.write_text(json.dumps(doc))

    for mode in [m for m in args.modes.split(",") if m]:
        offload, cfg_batch, tiling, cap = MODES[mode]
        if tiling:  # the 256-pixel tiles of the measured 720p row (the pipeline's default is 480x832)
            base.vae.enable_tiling(tile=256, stride=192)
        if cap is not None and device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(cap * GIB / total, torch.cuda.current_device())
        # the same components; the constructor moves them to their home (CPU with offload; once the
        # DiT streams its blocks, later modes must stream too)
        pipe = S2VPipeline(base.transformer, base.text_encoder, base.audio_encoder, base.vae,
                           device=device, offload=offload, cfg_batch=cfg_batch, compile_dit=args.compile)  # fmt: skip
        try:
            results.append(run_mode(pipe, args, device, mode))
        except torch.OutOfMemoryError as exc:
            results.append({"mode": mode, "error": f"out of memory: {str(exc).splitlines()[0]}", "clips": []})
            print(json.dumps(results[-1]), flush=True)
        finally:
            if cap is not None and device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
            if tiling:
                base.vae.disable_tiling()
        save()
    if args.dit_offload and device.type == "cuda":
        pipe = S2VPipeline(base.transformer, base.text_encoder, base.audio_encoder, base.vae, device=device,
                           offload="blocks" if block_streamer(base.transformer) else "none")  # fmt: skip
        extra["dit_offload"] = dit_offload_comparison(pipe, args, device)
        save()

    print(f"\n{info['device']}, torch {info['torch']}, {args.height}x{args.width}, {args.frames} frames, "
          f"{args.steps} steps, CFG")  # fmt: skip
    print("| mode | clip | resident before GiB | peak alloc GiB | peak reserved GiB | resident after GiB "
          "| s / step | s / clip | 40-step clip s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for res in results:
        if "error" in res:
            print(f"| {res['mode']} | {res['error']} |")
        for row in res["clips"]:
            before = res["resident_before"].get("allocated_gib", float("nan"))
            print(f"| {res['mode']} | {row['clip']} | {before:.1f} | {row.get('peak_allocated_gib', float('nan')):.1f} "
                  f"| {row.get('peak_reserved_gib', float('nan')):.1f} | {row.get('allocated_gib', float('nan')):.1f} "
                  f"| {np.mean(row['step_seconds']) if row['step_seconds'] else float('nan'):.2f} "
                  f"| {row['seconds']:.1f} | {row['clip_40_steps_seconds']:.0f} |")  # fmt: skip
    for row in extra.get("dit_offload", []):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
