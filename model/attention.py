"""Attention of the S2V transformer: the q/k/v/o module, its kernels and its 3-D rotary positions.

`Attention` (the official WanSelfAttention / WanCrossAttention / AudioCrossAttention) serves the
blocks' self- and cross-attention and the audio injection (model/conditioning.py); `attend` runs
the kernel (PyTorch SDPA, cuDNN first, or FlashAttention-4 as the custom op `s2v::fa4_attention`),
`attend_lse` the same with its log-sum-exp, which `merge_attention` uses to join two key sets;
`rope_table` builds the float32 cos/sin tables `apply_rope` rotates q and k by. The causal model
(model/causal.py, `kv_cache`) and sequence parallelism (model/parallel.py, `attend_hook`) hook in
here.

Speed choices: `F.scaled_dot_product_attention` (flash or cuDNN on GPU); `F.rms_norm` on q and k;
RoPE from real float32 cos/sin tables built once per shape and kept on the device by the model
(no float64/complex128, no host copies per call).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# cuDNN attention first: on an H100 it ran the 480p self-attention at about 600 TFLOP/s where the
# flash backend ran at about 380 (issue 4's measurements); the others stay as fallbacks.
SDPA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


def attention_backends(device: torch.device) -> AbstractContextManager:
    """Context preferring cuDNN SDPA on CUDA devices (a no-op elsewhere or on old torch)."""
    if device.type != "cuda" or not _HAS_PRIORITY:
        return nullcontext()
    return sdpa_kernel(SDPA_PRIORITY, set_priority=True)


# Kernels for the self-attention, half of a 480p forward's FLOPs: "sdpa" (PyTorch SDPA, cuDNN first)
# or "fa4" (FlashAttention-4's CuTe kernels from the `flash-attn-4` package, Hopper and Blackwell).
# FA4 serves the self-attention only: on the text and audio cross-attentions (512 and 5 keys) cuDNN
# was faster on an H100 (bench/dit_kernels.py); no other Hopper tile tried beat FA4's own 128 x 128.
ATTENTION_KERNELS = ("sdpa", "fa4")


def fa4_unavailable(device: torch.device) -> str | None:
    """Why the FA4 kernel cannot run on `device` (None when it can)."""
    if device.type != "cuda":
        return f"FA4 needs a CUDA GPU, not {device.type}"
    major = torch.cuda.get_device_capability(device)[0]
    if major not in (9, 10):
        return f"FA4 needs a Hopper or Blackwell GPU (compute capability 9.x or 10.x), this one is {major}.x"
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        return "FA4 needs the flash-attn-4 package (pip install flash-attn-4)"
    return None


# A custom op, so torch.compile'd blocks treat the kernel as one opaque call instead of breaking
# the graph around it; [B, S, H, D] in and out, the layout the projections produce (no transposes).
@torch.library.custom_op("s2v::fa4_attention", mutates_args=())
def fa4_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from flash_attn.cute import flash_attn_func

    return flash_attn_func(q, k, v)[0]


@fa4_attention.register_fake
def _fa4_attention_shape(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return q.new_empty(*q.shape[:3], v.shape[3])


class RMSNorm(nn.Module):
    """RMSNorm over the full width (the official norm_q / norm_k), fused by `F.rms_norm`."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x0, x1) of x [B, S, H, D] by the angles in `table` [S, 1, D, 2].

    The table holds per channel (cos, signed sin), so the rotation (x0 c - x1 s, x1 c + x0 s) is
    x * cos + pair_swap(x) * sin, in float32 whatever the dtype of x. Written this way (no split
    into pairs and stacking back) Inductor fuses it with the q/k RMSNorm and the cast to bf16 in
    one pass; the split-and-stack form left a float32 copy and a cast pass per block (a compiled
    480p block: 62.2 against 63.4 ms on an H100, bench/block_fusion.py).
    """
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (xf * table[..., 0] + swapped * table[..., 1]).to(x.dtype)


# (q, k, v, k_raw, kernel) -> attention output: see Attention.forward's kv_cache.
KVHook = Callable[[Tensor, Tensor, Tensor, Tensor, str], Tensor]
# (q, k, v, kernel) [B, S, H, D] -> [B, S, H, D]: the attention itself, `attend` unless a hook
# replaces it (Attention.attend_hook; sequence parallelism wraps it in all-to-alls, model/parallel.py).
AttendHook = Callable[[Tensor, Tensor, Tensor, str], Tensor]


def attend(q: Tensor, k: Tensor, v: Tensor, kernel: str = "sdpa") -> Tensor:
    """Attention of q [B, S, H, D] over k, v [B, L, H, D] with `kernel` ("sdpa" or "fa4") -> [B, S, H, D]."""
    if kernel == "fa4":
        return fa4_attention(q, k, v)
    # strided [B, H, S, D] views: cuDNN reads them as they are (contiguous head-major copies
    # measured no faster on an H100, see docs/benchmarks.md)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attend_lse(q: Tensor, k: Tensor, v: Tensor, kernel: str) -> tuple[Tensor, Tensor]:
    """Attention of q [B, S, H, D] over k, v [B, L, H, D] with `kernel` ("sdpa" or "fa4") and its
    log-sum-exp: ([B, S, H, D], [B, H, S] float32). SDPA's public call does not return the
    log-sum-exp, so the "sdpa" kernel calls the ATen kernels behind it."""
    if kernel == "fa4":
        from flash_attn.cute import flash_attn_func

        return flash_attn_func(q, k, v, return_lse=True)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)[:2]
    elif q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    else:  # float32 on CUDA: the memory-efficient kernel (its log-sum-exp is padded along S)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
        lse = lse[..., : q.shape[1]]
    return out.transpose(1, 2), lse


def merge_attention(a: Tensor, lse_a: Tensor, b: Tensor, lse_b: Tensor, out: Tensor) -> None:
    """Write into `out` the attention over the union of two key sets, from each set's output
    [B, S, H, D] and log-sum-exp [B, H, S]: their mix weighted by each set's share of the softmax
    mass, sigmoid(lse_a - lse_b) for `a`, computed in float32."""
    share_a = torch.sigmoid(lse_a - lse_b).transpose(1, 2).unsqueeze(-1)
    out.copy_(torch.lerp(b.float(), a.float(), share_a))


class Attention(nn.Module):
    """q/k/v/o projections with RMSNorm on q and k over the full width; self- or cross-attention.

    Names match the official WanSelfAttention / WanCrossAttention / AudioCrossAttention.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.kernel = "sdpa"  # or "fa4" (self-attention only), see WanS2VTransformer.set_attention
        # set from outside on the self-attention only: the one place where the whole sequence
        # meets, so sequence parallelism (model/parallel.py) exchanges shards around it
        self.attend_hook: AttendHook | None = None

    def forward(
        self, x: Tensor, context: Tensor | None = None, rope: Tensor | None = None, kv_cache: KVHook | None = None
    ) -> Tensor:
        """x [B, S, D]; context [B, L, D] (None: self-attention); rope [S, 1, D/H, 2] or None.

        kv_cache (self-attention only): the causal model's cache (model/causal.py), called with q, k
        rotated by `rope`, v, the un-rotated k (all [B, S, H, D]) and the kernel; it keeps what it
        caches and returns the attention output, over keys that may be longer than the queries.
        The rotation stays here, where a compiled block fuses it with the norms. A cache replaces
        `attend_hook` too (sequence parallelism refuses the causal model, model/parallel.py)."""
        b, s, d = x.shape
        src = x if context is None else context
        q = self.norm_q(self.q(x)).view(b, s, self.num_heads, -1)
        k_raw = self.norm_k(self.k(src)).view(b, src.shape[1], self.num_heads, -1)
        v = self.v(src).view(b, src.shape[1], self.num_heads, -1)
        k = k_raw
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k_raw, rope)
        kernel = self.kernel if context is None else "sdpa"
        if kv_cache is not None:
            out = kv_cache(q, k, v, k_raw, kernel)
        else:
            out = (self.attend_hook or attend)(q, k, v, kernel)
        return self.o(out.reshape(b, s, d))


# ---------------------------------------------------------------------------------------------
# 3-D RoPE tables


def _rope_inverse_freqs(head_dim: int) -> tuple[np.ndarray, list[int]]:
    """Inverse frequencies of the D/2 channel pairs and the (frame, height, width) split.

    The reference concatenates three tables of sizes d-4(d//6), 2(d//6), 2(d//6) and then splits
    the pairs as [c-2(c//3), c//3, c//3] (c = d/2); kept as is so any head size matches it.
    """
    d = head_dim
    dims = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    inv = np.concatenate([1.0 / np.power(10000.0, np.arange(0, k, 2, dtype=np.float64) / k) for k in dims])
    c = d // 2
    return inv, [c - 2 * (c // 3), c // 3, c // 3]


def _segment_positions(start: tuple, end: tuple, span: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer (frame, height, width) positions of one token grid, as the reference's
    rope_precompute: `n` positions spread by linspace over `span`, truncated to int; a grid that
    starts at a negative frame counts backwards (the reference conjugates the frequencies)."""
    (f0, h0, w0), (f1, h1, w1), (tf, th, tw) = start, end, span
    nf, nh, nw = f1 - f0, h1 - h0, w1 - w0
    forward = np.linspace(f0, tf + f0 - 1, nf).astype(int)
    backward = -np.linspace(-f0, -tf - f0 + 1, nf).astype(int)
    pf = forward if f0 >= 0 else backward
    ph = np.linspace(h0, th + h0 - 1, nh).astype(int)
    pw = np.linspace(w0, tw + w0 - 1, nw).astype(int)
    return pf, ph, pw


def rope_table(
    head_dim: int,
    segments: list[tuple[tuple, tuple, tuple]],
    *,
    max_position: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """float32 table [S, 1, head_dim, 2] for token grids in sequence order, for `apply_rope`: per
    channel (cos, signed sin) of its pair's angle; channel 2i holds (cos a_i, -sin a_i), 2i+1 holds
    (cos a_i, sin a_i).

    max_position: the length of the reference's tables (1024; LiveAvatar's causal model 45000).
    dtype: cos and sin are rounded to it before they are widened to float32 (LiveAvatar keeps its
    tables as float16 complex numbers; float32 leaves them as computed)."""
    inv, split = _rope_inverse_freqs(head_dim)
    inv_axes = np.split(inv, np.cumsum(split)[:2])
    rows = []
    for seg in segments:
        pf, ph, pw = _segment_positions(*seg)
        if len(pf) * len(ph) * len(pw) == 0:
            continue
        if max(abs(pf).max(), ph.max(), pw.max()) >= max_position:
            raise ValueError(f"RoPE position beyond the reference's {max_position}-entry tables for grid {seg}")
        af = np.outer(pf, inv_axes[0])[:, None, None, :]
        ah = np.outer(ph, inv_axes[1])[None, :, None, :]
        aw = np.outer(pw, inv_axes[2])[None, None, :, :]
        shape = (len(pf), len(ph), len(pw))
        ang = np.concatenate(
            [
                np.broadcast_to(af, (*shape, af.shape[-1])),
                np.broadcast_to(ah, (*shape, ah.shape[-1])),
                np.broadcast_to(aw, (*shape, aw.shape[-1])),
            ],
            axis=-1,
        ).reshape(-1, inv.shape[0])
        sin = np.repeat(np.sin(ang), 2, axis=-1)
        sin[:, 0::2] *= -1
        rows.append(np.stack([np.repeat(np.cos(ang), 2, axis=-1), sin], axis=-1))
    table = np.concatenate(rows, axis=0) if rows else np.zeros((0, head_dim, 2))
    return torch.from_numpy(table).to(dtype).float()[:, None]
