"""The DiT's hot kernels in isolation, on the exact shapes of a 480p first-clip forward (issue 4,
item 6): which attention kernel (`model/attention.py`) and which feed-forward form (`model/transformer.py`)
should use.

Attention, for each of the forward's three attention shapes (self-attention over 32,760 tokens,
cross-attention to the 512 text tokens, per-frame audio attention to 5 audio tokens): PyTorch SDPA
with the cuDNN and flash backends, and FlashAttention-4 (`flash-attn-4`) at its default tile and
at other Hopper tiles (`--tiles`); milliseconds, TFLOP/s and the relative L2 difference from cuDNN.
Feed-forward (5120 -> 13824 -> 5120, tanh GELU): bias and GELU as a separate pass after the first
GEMM versus fused into cuBLASLt's GEMM epilogue (`torch._addmm_activation`), eager and compiled,
with the relative L2 error of each against float32. Also the bf16 matmul rate of the same call.

    python3 bench/dit_kernels.py                        # on an H100 (FA4 as in docs/benchmarks.md)
    python3 bench/dit_kernels.py --best-tile-file t.txt  # also write the fastest FA4 self-attention tile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_speed import matmul_tflops, time_ms  # noqa: E402

from model.attention import fa4_unavailable  # noqa: E402
from model.config import S2VConfig  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def attention_shapes(cfg: S2VConfig, size: tuple[int, int], frames: int) -> dict[str, tuple]:
    """name -> (batch, query tokens, key tokens) of the forward's attentions, batch 1."""
    f = cfg.latent_frames(frames) // cfg.patch_size[0]
    hw = (size[0] // 16) * (size[1] // 16)
    seq = f * hw + hw
    return {
        "self": (1, seq, seq),
        "text cross": (1, seq, cfg.text_len),
        "audio": (f, hw, cfg.num_audio_token + 1),
    }


def bench_attention(cfg: S2VConfig, shapes: dict, tiles: list[tuple[int, int]], device, repeats: int) -> list[dict]:
    heads, hd = cfg.num_heads, cfg.dim // cfg.num_heads
    rows: list[dict] = []
    for name, (b, sq, sk) in shapes.items():
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, sq, heads, hd, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(b, sk, heads, hd, device=device, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(b, sk, heads, hd, device=device, dtype=torch.bfloat16, generator=gen)
        flops = 4 * b * heads * sq * sk * hd
        ref = None
        for label, fn in attention_kernels(q, k, v, tiles if name == "self" else [], device):
            try:
                out = fn()
                ms = statistics.median(time_ms(fn, device, repeats, warmup=2))
            except Exception as exc:  # a tile the kernel cannot build here: say so and go on
                print(f"{name:10s} {label:14s} failed: {str(exc).splitlines()[0][:150]}", flush=True)
                rows.append({"shape": name, "kernel": label, "error": str(exc)[:300]})
                continue
            ref = out if ref is None else ref
            row = {"shape": name, "kernel": label, "b_sq_sk": [b, sq, sk], "ms": ms, "tflops": flops / ms / 1e9}
            row["rel_vs_cudnn"] = rel(out, ref)
            rows.append(row)
            print(
                f"{name:10s} {label:14s} {ms:8.3f} ms  {row['tflops']:6.0f} TFLOP/s  "
                f"rel vs cuDNN {row['rel_vs_cudnn']:.1e}",
                flush=True,
            )
            del out
        del q, k, v, ref
        torch.cuda.empty_cache()
    return rows


def attention_kernels(q, k, v, tiles: list[tuple[int, int]], device) -> list[tuple[str, object]]:
    """(label, call) of each kernel for q, k, v [B, S, H, D]; cuDNN first (the reference)."""

    def sdpa(backend):
        def call():
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)

        return call

    kernels = [("sdpa cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)), ("sdpa flash", sdpa(SDPBackend.FLASH_ATTENTION))]
    if fa4_unavailable(device) is None:
        from flash_attn.cute.interface import _flash_attn_fwd, flash_attn_func

        kernels.append(("fa4 default", lambda: flash_attn_func(q, k, v)[0]))
        for tm, tn in tiles:
            kernels.append((f"fa4 {tm}x{tn}", lambda tm=tm, tn=tn: _flash_attn_fwd(q, k, v, tile_mn=(tm, tn))[0]))
    return kernels


def bench_ffn(cfg: S2VConfig, tokens: int, device, repeats: int) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(1)
    d, ff = cfg.dim, cfg.ffn_dim
    x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16, generator=gen)
    w1 = torch.randn(ff, d, device=device, dtype=torch.bfloat16, generator=gen) / d**0.5
    b1 = torch.randn(ff, device=device, dtype=torch.bfloat16, generator=gen) * 0.1
    w2 = torch.randn(d, ff, device=device, dtype=torch.bfloat16, generator=gen) / ff**0.5
    b2 = torch.randn(d, device=device, dtype=torch.bfloat16, generator=gen) * 0.1

    def separate(x):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

    def epilogue(x):
        return F.linear(torch._addmm_activation(b1, x, w1.t(), use_gelu=True), w2, b2)

    want = F.linear(F.gelu(F.linear(x.float(), w1.float(), b1.float()), approximate="tanh"), w2.float(), b2.float())
    flops = 2 * 2 * tokens * d * ff
    rows = []
    for label, fn in (
        ("gelu separate, eager", separate),
        ("gelu in epilogue, eager", epilogue),
        ("gelu separate, compiled", torch.compile(separate, dynamic=False)),
        ("gelu in epilogue, compiled", torch.compile(epilogue, dynamic=False)),
    ):
        out = fn(x)
        ms = statistics.median(time_ms(lambda fn=fn: fn(x), device, repeats, warmup=2))
        row = {"ffn": label, "tokens": tokens, "ms": ms, "tflops": flops / ms / 1e9, "rel_vs_fp32": rel(out, want)}
        rows.append(row)
        print(f"ffn {label:28s} {ms:8.3f} ms  {row['tflops']:5.0f} TFLOP/s  rel vs fp32 {row['rel_vs_fp32']:.2e}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="480x832")
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiles", default="128x128,128x144,128x160,128x176,128x192", help="FA4 self-attention tiles")
    parser.add_argument("--best-tile-file", default=None, help="write the fastest FA4 self-attention tile here")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    device = torch.device("cuda")
    cfg = S2VConfig.wan_14b()
    size = tuple(int(v) for v in args.size.split("x"))
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",") if t]
    rate = matmul_tflops(device, torch.bfloat16, 8192)
    results = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "matmul_tflops": rate}
    print(f"{results['gpu']}  torch {torch.__version__}  bf16 matmul {rate:.0f} TFLOP/s", flush=True)
    with torch.no_grad():
        shapes = attention_shapes(cfg, size, args.frames)
        results["attention"] = bench_attention(cfg, shapes, tiles, device, args.repeats)
        results["ffn"] = bench_ffn(cfg, shapes["self"][1], device, args.repeats)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "dit_kernels.json").write_text(json.dumps(results, indent=2))
    if args.best_tile_file:
        fa4 = [r for r in results["attention"] if r["shape"] == "self" and r["kernel"].startswith("fa4") and "ms" in r]
        best = min(fa4, key=lambda r: r["ms"])["kernel"].split()[-1] if fa4 else "default"
        Path(args.best_tile_file).write_text(best)
        print(f"fastest FA4 self-attention tile: {best}", flush=True)


if __name__ == "__main__":
    main()
