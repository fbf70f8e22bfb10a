"""The block-causal S2V transformer of LiveAvatar and its key-value cache.

LiveAvatar (Alibaba-Quark/LiveAvatar, arXiv 2512.04677; `liveavatar/models/wan/causal_model_s2v.py`)
runs the Wan2.2-S2V DiT on one block of 3 latent frames at a time. Written here from that code
as the specification; `CausalS2V` wraps our `WanS2VTransformer` and runs its own modules (patch
embedding, blocks, audio injection, head): the maths per token is the transformer's, only the
token layout and the self-attention's keys differ.

- **Condition tokens, once per segment** (`prefill`, their "sink" forward): the reference image
  (RoPE frame 30) and the FramePack motion tokens (negative frames) go through all blocks alone,
  at timestep 0, attending only to each other, without audio. Each block keeps their un-rotated
  keys and their values.
- **One block of video, per denoising step** (`forward_blocks`): the block's tokens are the only
  queries. Their keys and values are rotated at their absolute frame positions (block n covers
  frames 3n .. 3n+2) and written into the step's ring buffer, which holds the last `window`
  blocks (block n in slot n % window); the queries attend to the condition tokens (keys rotated
  anew each call, see below) and to every filled slot. Each denoising step has its own ring: the
  blocks before are seen at the noise level of the same step, never re-encoded clean. The ring
  and the condition keys are attended to apart and the two softmaxes merged by their log-sum-exps
  (exact up to rounding), so neither is copied next to the other per row and layer.
- **The reference moves with the video**: at every call LiveAvatar draws a distance d in [4, 30]
  (Python's `random.randint`) and rotates the reference keys at frame max(30, 3n + d), so the
  reference stays a few frames ahead of the block however long the video; the motion tokens keep
  their negative frames. Here the draw comes from a `random.Random` the caller owns (seeded:
  reruns and resumed segments repeat it).
- RoPE tables are rounded to float16 before use, as LiveAvatar builds them (complex32), for
  positions up to 45000 latent frames (its table length: three hours of video).

Each call runs the transformer's blocks with a `kv_cache` hook on the self-attention
(`model.attention.Attention`); cross-attention to the text, the feed-forward, the per-frame audio
injection and the head are the transformer's own code. Batch size 1 (LiveAvatar has no CFG).
Where the blocks are compiled (`compile_blocks`, as exact mode has them on CUDA) the causal
forwards run them compiled too: the hooks stay outside the graphs, which are made once per
(rows, filled ring) layout, about eight of them, and shared by all layers and segments.
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from model.attention import apply_rope, attend, attend_lse, attention_backends, merge_attention, rope_table
from model.transformer import WanS2VTransformer

__all__ = ["FRAMES_PER_BLOCK", "CausalS2V", "StreamCache", "reference_shift"]

FRAMES_PER_BLOCK = 3  # latent frames per block (LiveAvatar's num_frames_per_block)
ROPE_POSITIONS = 45000  # LiveAvatar's RoPE tables (rope_params(45000, ...))
REFERENCE_FRAME = 30  # the reference's RoPE frame in the S2V model
REFERENCE_DISTANCE = (4, 30)  # LiveAvatar's random.randint(4, 30): the reference's lead over a block
ROPE_DTYPE = torch.float16  # LiveAvatar's rope_precompute stores its tables as complex32


def reference_shift(first_frame: int, rng: random.Random) -> int:
    """Frames the reference's RoPE position moves for a block starting at `first_frame`: one draw
    d of `rng` (as LiveAvatar's random.randint(4, 30)) puts it at max(30, first_frame + d)."""
    distance = rng.randint(*REFERENCE_DISTANCE)
    return max(0, first_frame - (REFERENCE_FRAME - distance))


@dataclass
class _Row:
    """Where one row of the next forward writes and what it reads (set by `StreamCache.seek`)."""

    step: int
    slot: int  # first token of the block's slot in the step's ring
    filled: int  # ring tokens the block attends to (its own included)


class StreamCache:
    """The keys and values the causal transformer carries from block to block, per layer:

    - `cond_k` / `cond_v` [1, C, H, D]: the condition tokens (reference + motion), keys un-rotated;
    - `ring_k` / `ring_v` [steps, 1, window * block_tokens, H, D]: per denoising step, the rotated
      keys and the values of the last `window` blocks at that step.

    At 480x832 (1560 tokens a latent frame), 4 steps and a window of 4 blocks the rings hold
    4 x 40 x 2 x 18720 x 5120 values, 57 GiB in bf16, and the 3,874 condition tokens 3 GiB more."""

    def __init__(
        self,
        model: WanS2VTransformer,
        *,
        steps: int,
        window: int,
        block_tokens: int,
        cond_tokens: int,
        device: torch.device | str,
    ) -> None:
        cfg = model.config
        self.steps, self.window, self.block_tokens = steps, window, block_tokens
        dtype = model.compute_dtype
        heads, head_dim = cfg.num_heads, cfg.head_dim
        ring = (steps, 1, window * block_tokens, heads, head_dim)
        cond = (1, cond_tokens, heads, head_dim)
        # uninitialised: a slot is read only after this segment wrote it (`seek`'s `filled`)
        self.ring_k = [torch.empty(ring, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.ring_v = [torch.empty(ring, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.cond_k = [torch.empty(cond, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.cond_v = [torch.empty(cond, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.rows: list[_Row] = []
        self.cond_rope: Tensor | None = None  # [rows, C, 1, D, 2]: each row's rotation of the condition keys
        self.prefill_hooks = [_Prefill(self, i) for i in range(cfg.num_layers)]
        self.stream_hooks = [_Stream(self, i) for i in range(cfg.num_layers)]

    def seek(self, rows: list[tuple[int, int]], cond_ropes: list[Tensor]) -> None:
        """Point the stream hooks at the next forward's rows: (block counted from the segment's
        start, denoising step) each, with the rotation of the condition keys for each. The rows
        must see rings filled equally far (one attention length for the batch)."""
        if len(cond_ropes) != len(rows):
            raise ValueError(f"{len(rows)} rows, {len(cond_ropes)} rotations of the condition keys")
        self.rows = []
        for block, step in rows:
            if not 0 <= step < self.steps:
                raise ValueError(f"step {step}: this cache holds {self.steps} steps")
            slot = (block % self.window) * self.block_tokens
            self.rows.append(_Row(step, slot, self.filled(block)))
        if len({row.filled for row in self.rows}) > 1:
            raise ValueError(f"rows {rows} see rings filled to different lengths; run them apart")
        self.cond_rope = torch.stack(cond_ropes)

    def filled(self, block: int) -> int:
        """Ring tokens block `block` attends to: its own and those of up to window - 1 blocks before."""
        return min(block + 1, self.window) * self.block_tokens

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.ring_k, *self.ring_v, *self.cond_k, *self.cond_v))


class _Hook:
    """A cache hook of one layer. It holds its cache weakly: a strong reference would make a
    cycle (cache -> hooks -> cache), which Python frees only when its cyclic collector next runs,
    so a finished segment's 60 GiB would stay allocated into the next segment's (seen as an
    out-of-memory error on the second segment of a process)."""

    def __init__(self, cache: StreamCache, layer: int) -> None:
        self._cache, self.layer = weakref.ref(cache), layer

    @property
    def cache(self) -> StreamCache:
        cache = self._cache()
        if cache is None:
            raise RuntimeError("this cache hook outlived its cache")
        return cache


class _Prefill(_Hook):
    """Self-attention hook of the condition pass: keep the keys (un-rotated) and values."""

    @torch.compiler.disable  # see _Stream.__call__
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, k_raw: Tensor, kernel: str) -> Tensor:
        self.cache.cond_k[self.layer].copy_(k_raw)
        self.cache.cond_v[self.layer].copy_(v)
        return attend(q, k, v, kernel)


class _Stream(_Hook):
    """Self-attention hook of a video block: write the block's keys and values into the step's
    ring; attend to the filled part of the ring and, apart, to the condition tokens; merge."""

    # Outside torch.compile's graphs (a graph break in the compiled block): traced, the hook's
    # layer index and ring tensors would specialise the block's graph per layer (40 recompiles).
    @torch.compiler.disable
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, k_raw: Tensor, kernel: str) -> Tensor:
        cache, layer = self.cache, self.layer
        cond_k = apply_rope(cache.cond_k[layer], cache.cond_rope)  # [rows, C, H, D], one pass for all rows
        cond_v = cache.cond_v[layer]
        out = torch.empty_like(q)
        for j, row in enumerate(cache.rows):
            ring_k, ring_v = cache.ring_k[layer][row.step], cache.ring_v[layer][row.step]
            end = row.slot + k.shape[1]
            ring_k[:, row.slot : end] = k[j : j + 1]
            ring_v[:, row.slot : end] = v[j : j + 1]
            query = q[j : j + 1]
            ring = attend_lse(query, ring_k[:, : row.filled], ring_v[:, : row.filled], kernel)
            cond = attend_lse(query, cond_k[j : j + 1], cond_v, kernel)
            merge_attention(*ring, *cond, out=out[j : j + 1])
        return out


class CausalS2V:
    """LiveAvatar's causal forwards on a `WanS2VTransformer` (see the module docstring).

    `prefill` once per segment, then `forward_blocks` per block and denoising step. The cache's
    `window` is the number of blocks a block sees (itself included); LiveAvatar's is one clip.
    """

    def __init__(self, model: WanS2VTransformer) -> None:
        cfg = model.config
        if not (cfg.enable_framepack and cfg.zero_timestep and cfg.patch_size[0] == 1):
            raise ValueError("the causal S2V model needs FramePack motion, zero_timestep and a temporal patch of 1")
        self.model = model

    @property
    def config(self):
        return self.model.config

    def _table(self, segments: list, device: torch.device) -> Tensor:
        return rope_table(self.config.head_dim, segments, max_position=ROPE_POSITIONS, dtype=ROPE_DTYPE).to(device)

    def cond_segments(self, lat_h: int, lat_w: int, shift: int = 0) -> list:
        """RoPE grids of the condition tokens: the reference at frame 30 + shift, then FramePack's."""
        h, w = lat_h // 2, lat_w // 2
        ref = ((REFERENCE_FRAME + shift, 0, 0), (REFERENCE_FRAME + shift + 1, h, w), (1, h, w))
        return [ref, *self.model.frame_packer.segments(lat_h, lat_w, self._add_last_motion)]

    @property
    def _add_last_motion(self) -> int:
        return 2 * int(self.config.add_last_motion)

    def _cache_sizes(self, lat_h: int, lat_w: int) -> tuple[int, int]:
        """(tokens of a block, condition tokens) for latent frames of lat_h x lat_w."""
        p = self.config.patch_size
        frame_tokens = (lat_h // p[1]) * (lat_w // p[2])
        cond_tokens = sum(
            (end[0] - start[0]) * (end[1] - start[1]) * (end[2] - start[2])
            for start, end, _ in self.cond_segments(lat_h, lat_w)
        )
        return FRAMES_PER_BLOCK * frame_tokens, cond_tokens

    def cache_bytes(self, *, steps: int, window: int, lat_h: int, lat_w: int) -> int:
        """Bytes `new_cache` allocates (keys and values of every layer, in the compute dtype)."""
        block_tokens, cond_tokens = self._cache_sizes(lat_h, lat_w)
        cfg = self.config
        values = 2 * cfg.num_layers * (steps * window * block_tokens + cond_tokens) * cfg.dim
        return values * torch.finfo(self.model.compute_dtype).bits // 8

    def new_cache(self, *, steps: int, window: int, lat_h: int, lat_w: int, device: torch.device | str) -> StreamCache:
        """An empty cache for blocks of FRAMES_PER_BLOCK latent frames of lat_h x lat_w."""
        block_tokens, cond_tokens = self._cache_sizes(lat_h, lat_w)
        return StreamCache(
            self.model, steps=steps, window=window, block_tokens=block_tokens, cond_tokens=cond_tokens, device=device
        )

    @torch.no_grad()
    def prefill(self, cache: StreamCache, ref_latents: Tensor, motion_latents: Tensor, ctx: Tensor) -> None:
        """Fill the condition keys and values: ref_latents [1, 16, 1, H, W], motion_latents
        [1, 16, T_m, H, W] (the last 19 frames are packed), ctx = `model.text_context(context, 1)`."""
        model = self.model
        _, _, _, lat_h, lat_w = ref_latents.shape
        device = ref_latents.device
        with attention_backends(device):
            x = torch.cat(
                [model.reference_tokens(ref_latents), model.motion_tokens(motion_latents, self._add_last_motion)], dim=1
            )
            if x.shape[1] != cache.cond_k[0].shape[1]:
                raise ValueError(f"condition tokens: {x.shape[1]}, the cache was made for {cache.cond_k[0].shape[1]}")
            _, e0 = model.time_modulation(torch.zeros(1, device=device))
            rope = self._table(self.cond_segments(lat_h, lat_w), device)
            model.run_blocks(x, ctx, [(0, x.shape[1], e0)], rope, 0, None, kv_caches=cache.prefill_hooks)

    @torch.no_grad()
    def forward_blocks(
        self,
        cache: StreamCache,
        latents: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        audio: Tensor,
        *,
        rows: list[tuple[int, int]],
        shifts: list[int],
        pose_latents: Tensor | None = None,
    ) -> Tensor:
        """Velocities of several blocks in one forward, row j being block rows[j][0] (counted from
        the segment's start) at denoising step rows[j][1]; no two rows may share a step, and all
        must see equally filled rings (`StreamCache.filled`): LiveAvatar's timestep-forcing
        pipeline, which runs step i of block n beside step i + 1 of block n - 1 (on one GPU here).

        latents [R, 16, 3, H, W]; timesteps [R] (a device tensor); ctx = `model.text_context(c, 1)`;
        audio [R, layers, C_a, 12] (each block's 12 video frames of wav2vec2 features); shifts: the
        reference's RoPE shift per row (`reference_shift`); pose_latents [R, 16, 3, H, W] or None.
        Returns [R, 16, 3, H, W] float32."""
        model, cfg = self.model, self.config
        r, _, frames, lat_h, lat_w = latents.shape
        if frames != FRAMES_PER_BLOCK or len(rows) != r or len(shifts) != r:
            want = f"[{len(rows)}, {cfg.in_dim}, {FRAMES_PER_BLOCK}, H, W] with a row and a shift each"
            raise ValueError(f"latents: expected {want}, got {list(latents.shape)}")
        if len({step for _, step in rows}) != r:
            raise ValueError(f"rows {rows}: each step's ring takes one block per forward")
        p = cfg.patch_size
        h, w = lat_h // p[1], lat_w // p[2]
        if frames * h * w != cache.block_tokens:
            raise ValueError(f"a block of {frames * h * w} tokens does not fit this cache ({cache.block_tokens})")
        device = latents.device
        with attention_backends(device):
            cache.seek(rows, [self._table(self.cond_segments(lat_h, lat_w, s), device) for s in shifts])
            rope = torch.stack(
                [self._table([((n * frames, 0, 0), ((n + 1) * frames, h, w), (frames, h, w))], device) for n, _ in rows]
            )
            x = model.video_tokens(latents, pose_latents)
            e, e0 = model.time_modulation(timesteps.reshape(r).float())
            audio_tokens = model.encode_audio(audio)
            x = model.run_blocks(
                x, ctx.expand(r, -1, -1), [(0, x.shape[1], e0)], rope, h * w, audio_tokens, cache.stream_hooks
            )
            return model.unpatchify(model.head(x, e), frames, h, w)

    def forward_block(
        self,
        cache: StreamCache,
        latents: Tensor,
        timestep: Tensor,
        ctx: Tensor,
        audio: Tensor,
        *,
        block: int,
        step: int,
        shift: int,
        pose_latents: Tensor | None = None,
    ) -> Tensor:
        """`forward_blocks` for one block: latents [1, 16, 3, H, W], timestep [1], audio [1, ...]."""
        return self.forward_blocks(
            cache, latents, timestep, ctx, audio, rows=[(block, step)], shifts=[shift], pose_latents=pose_latents
        )
