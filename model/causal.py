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
- **One block of video, per denoising step** (`forward_block`): the block's tokens are the only
  queries. Their keys and values are rotated at their absolute frame positions (block n covers
  frames 3n .. 3n+2) and written into the step's ring buffer, which holds the last `window`
  blocks (block n in slot n % window); the queries attend to the condition tokens (keys rotated
  anew each call, see below) and to every filled slot. Each denoising step has its own ring: the
  blocks before are seen at the noise level of the same step, never re-encoded clean.
- **The reference moves with the video**: at every call LiveAvatar draws a distance d in [4, 30]
  (Python's `random.randint`) and rotates the reference keys at frame max(30, 3n + d), so the
  reference stays a few frames ahead of the block however long the video; the motion tokens keep
  their negative frames. Here the draw comes from a `random.Random` the caller owns (seeded:
  reruns and resumed segments repeat it).
- RoPE tables are rounded to float16 before use, as LiveAvatar builds them (complex32), for
  positions up to 45000 latent frames (its table length: three hours of video).

Each call runs the transformer's blocks with a `kv_cache` hook on the self-attention
(`model.transformer.Attention`); cross-attention to the text, the feed-forward, the per-frame audio
injection and the head are the transformer's own code. Batch size 1 (LiveAvatar has no CFG).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from model.transformer import WanS2VTransformer, apply_rope, attention_backends, rope_table

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
class _Position:
    """Where the next `forward_block` writes and what it reads (set by CausalS2V before each call)."""

    step: int = 0
    slot: int = 0  # first token of the block's slot in the ring
    filled: int = 0  # ring tokens the block attends to (its own included)
    cond_rope: Tensor | None = None  # rotation of the condition keys for this call


class StreamCache:
    """The keys and values the causal transformer carries from block to block, per layer:

    - `cond_k` / `cond_v` [1, C, H, D]: the condition tokens (reference + motion), keys un-rotated;
    - `ring_k` / `ring_v` [steps, 1, window * block_tokens, H, D]: per denoising step, the rotated
      keys and the values of the last `window` blocks at that step.

    At 480x832 (1560 tokens a latent frame), 4 steps and a window of 4 blocks the rings hold
    4 x 40 x 2 x 18720 x 5120 values: 61 GB in bf16, plus 3 GB for the condition tokens."""

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
        self.ring_k = [torch.zeros(ring, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.ring_v = [torch.zeros(ring, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.cond_k = [torch.zeros(cond, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.cond_v = [torch.zeros(cond, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.position = _Position()
        self.prefill_hooks = [_Prefill(self, i) for i in range(cfg.num_layers)]
        self.stream_hooks = [_Stream(self, i) for i in range(cfg.num_layers)]

    def seek(self, block: int, step: int, cond_rope: Tensor) -> None:
        """Point the stream hooks at block `block` (counted from the segment's start) of step `step`,
        the condition keys rotated by `cond_rope`."""
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step}: this cache holds {self.steps} steps")
        pos = self.position
        pos.step, pos.cond_rope = step, cond_rope
        pos.slot = (block % self.window) * self.block_tokens
        pos.filled = min(block + 1, self.window) * self.block_tokens

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.ring_k, *self.ring_v, *self.cond_k, *self.cond_v))


class _Prefill:
    """Self-attention hook of the condition pass: keep the keys (un-rotated) and values."""

    def __init__(self, cache: StreamCache, layer: int) -> None:
        self.cache, self.layer = cache, layer

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        self.cache.cond_k[self.layer].copy_(k)
        self.cache.cond_v[self.layer].copy_(v)
        return apply_rope(q, rope), apply_rope(k, rope), v


class _Stream:
    """Self-attention hook of a video block: write the block's keys and values into the step's
    ring, attend to the condition tokens and the filled part of the ring."""

    def __init__(self, cache: StreamCache, layer: int) -> None:
        self.cache, self.layer = cache, layer

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        cache, pos = self.cache, self.cache.position
        ring_k = cache.ring_k[self.layer][pos.step]
        ring_v = cache.ring_v[self.layer][pos.step]
        end = pos.slot + k.shape[1]
        ring_k[:, pos.slot : end] = apply_rope(k, rope)
        ring_v[:, pos.slot : end] = v
        cond_k = apply_rope(cache.cond_k[self.layer], pos.cond_rope)
        keys = torch.cat([ring_k[:, : pos.filled], cond_k], dim=1)
        values = torch.cat([ring_v[:, : pos.filled], cache.cond_v[self.layer]], dim=1)
        return apply_rope(q, rope), keys, values


class CausalS2V:
    """LiveAvatar's causal forwards on a `WanS2VTransformer` (see the module docstring).

    `prefill` once per segment, then `forward_block` per block and denoising step. The cache's
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

    def new_cache(
        self, *, steps: int, window: int, lat_h: int, lat_w: int, device: torch.device | str
    ) -> StreamCache:
        """An empty cache for blocks of FRAMES_PER_BLOCK latent frames of lat_h x lat_w."""
        p = self.config.patch_size
        frame_tokens = (lat_h // p[1]) * (lat_w // p[2])
        cond_tokens = sum(
            (end[0] - start[0]) * (end[1] - start[1]) * (end[2] - start[2])
            for start, end, _ in self.cond_segments(lat_h, lat_w)
        )
        return StreamCache(
            self.model,
            steps=steps,
            window=window,
            block_tokens=FRAMES_PER_BLOCK * frame_tokens,
            cond_tokens=cond_tokens,
            device=device,
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
        """Velocity of block `block` (counted from the segment's start) at denoising step `step`.

        latents [1, 16, 3, H, W]; timestep [1] (a device tensor); ctx = `model.text_context`;
        audio [1, layers, C_a, 12] (the block's 12 video frames of wav2vec2 features);
        shift: the reference's RoPE shift for this call (`reference_shift`);
        pose_latents [1, 16, 3, H, W] or None. Returns [1, 16, 3, H, W] float32."""
        model, cfg = self.model, self.config
        _, _, frames, lat_h, lat_w = latents.shape
        if frames != FRAMES_PER_BLOCK or latents.shape[0] != 1:
            want = f"[1, {cfg.in_dim}, {FRAMES_PER_BLOCK}, H, W]"
            raise ValueError(f"latents: expected {want}, got {list(latents.shape)}")
        p = cfg.patch_size
        h, w = lat_h // p[1], lat_w // p[2]
        if frames * h * w != cache.block_tokens:
            raise ValueError(f"a block of {frames * h * w} tokens does not fit this cache ({cache.block_tokens})")
        device = latents.device
        first = block * frames
        with attention_backends(device):
            cache.seek(block, step, self._table(self.cond_segments(lat_h, lat_w, shift), device))
            rope = self._table([((first, 0, 0), (first + frames, h, w), (frames, h, w))], device)
            x = model.video_tokens(latents, pose_latents)
            e, e0 = model.time_modulation(timestep.reshape(1).float())
            audio_tokens = model.encode_audio(audio)
            x = model.run_blocks(x, ctx, [(0, x.shape[1], e0)], rope, h * w, audio_tokens, cache.stream_hooks)
            return model.unpatchify(model.head(x, e), frames, h, w)
