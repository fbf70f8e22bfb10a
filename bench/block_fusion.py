"""One compiled S2V block at full width on a 480p first clip's 32,760 tokens (issue 4, item 6):
its kernel-time breakdown, and variants of the elementwise work Inductor fuses around the GEMMs
and the attention, each timed against the current code in the same process.

Variants (each a fresh torch.compile of the block, FA4 self-attention where installed):
- current: the code as it is (RoPE as x * cos + pair_swap(x) * signed sin);
- split-rope: RoPE as before, splitting the channel pairs and stacking them back (the form that
  left a float32 copy of k and a cast pass per block);
- coord: Inductor's coordinate-descent tuning of its Triton kernels' launch configurations;
- multi-kernel: Inductor's multi-kernel reductions (persistent and looped, the faster chosen);
- current-again: the first variant once more, for the drift between variants.

    python3 bench/block_fusion.py                  # on an H100 (FA4 as in docs/benchmarks.md)
    python3 bench/block_fusion.py --variants current,coord
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_speed import build_ours, profile_forward, time_ms  # noqa: E402

from model import attention  # noqa: E402
from model.config import S2VConfig  # noqa: E402

CURRENT_ROPE = attention.apply_rope
OPTIONS = {"coord": {"coordinate_descent_tuning": True}, "multi-kernel": {"triton.multi_kernel": 1}}


def split_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The earlier RoPE: x [B, S, H, D] split into channel pairs rotated by a [S, 1, D/2, 2]
    (cos, sin) table and stacked back."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = table[..., 0], table[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


def pair_table(table: torch.Tensor) -> torch.Tensor:
    """The current [S, 1, D, 2] (cos, signed sin) table as the earlier [S, 1, D/2, 2] (cos, sin)."""
    return torch.stack([table[..., 1::2, 0], table[..., 1::2, 1]], dim=-1).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="current,split-rope,coord,multi-kernel,current-again")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    device = torch.device("cuda")
    cfg = dataclasses.replace(S2VConfig.wan_14b(), num_layers=1, audio_inject_layers=(0,))
    model = build_ours(cfg, device, torch.bfloat16, seed=0)
    try:
        model.set_attention("fa4")
    except ValueError as exc:
        print(f"FA4 unavailable ({exc}); SDPA", flush=True)
    block = model.blocks[0]
    f, h, w = 20, 30, 52
    n_vid, seq = f * h * w, f * h * w + h * w
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, seq, cfg.dim, device=device, generator=gen)
    ctx = torch.randn(1, cfg.text_len, cfg.dim, device=device, dtype=torch.bfloat16, generator=gen)
    e0 = torch.randn(2, 6, cfg.dim, device=device, generator=gen) * 0.1
    temb = [(0, n_vid, e0[:1]), (n_vid, seq, e0[1:])]
    table = model._rope([((0, 0, 0), (f, h, w), (f, h, w)), ((30, 0, 0), (31, h, w), (1, h, w))], device)
    tables = {"current": table, "split": pair_table(table)}

    results: dict = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "variants": {}}
    ref = None
    with torch.no_grad():
        for name in [v for v in args.variants.split(",") if v]:
            torch._dynamo.reset()
            attention.apply_rope = split_rope if name == "split-rope" else CURRENT_ROPE
            rope = tables["split" if name == "split-rope" else "current"]
            compiled = torch.compile(block, dynamic=False, options=OPTIONS.get(name))
            out = compiled(x, ctx, temb, rope)
            ref = out if ref is None else ref
            ms = statistics.median(time_ms(lambda c=compiled, r=rope: c(x, ctx, temb, r), device, args.repeats, 2))
            diff = ((out - ref).norm() / (ref - x).norm()).item()
            print(f"\n{name}: {ms:.2f} ms per block (x40 = {40 * ms:.0f} ms); rel diff of the update {diff:.1e}")
            prof = profile_forward(lambda c=compiled, r=rope: c(x, ctx, temb, r), device)
            results["variants"][name] = {"ms": ms, "rel_diff_update": diff, "profile": prof}
            del out
    attention.apply_rope = CURRENT_ROPE
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "block_fusion.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
