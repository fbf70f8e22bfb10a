"""The Wan2.2-S2V diffusion transformer (`WanS2VTransformer`).

Written from the official `wan/modules/s2v/model_s2v.py` (and DiffSynth-Studio's port) as the
specification: parameter names and shapes match the official checkpoint exactly, so
`diffusion_pytorch_model*.safetensors` loads with strict key matching (see `model/checkpoint.py`).

The sequence the blocks see, in order::

    [ video tokens (F*h*w) | reference tokens (h*w) | motion tokens (FramePack, 0 on a first clip) ]

- video tokens: patch embedding of the noisy latents + the pose condition (`cond_encoder`);
- reference tokens: the reference image latent, RoPE frame position 30 (far from the clip);
- motion tokens: the last 19 latent frames of the video so far, packed at three rates
  (1 frame at 1x, 2 frames at 2x, 16 frames at 4x) with negative RoPE frame positions;
- `trainable_cond_mask` adds a learned vector per kind (0 video, 1 reference, 2 motion);
- with `zero_timestep` the reference and motion tokens are modulated with timestep 0.

After the configured blocks the audio is injected: per latent frame, the video tokens of that
frame cross-attend to that frame's audio tokens (AdaIN on the audio's global vector first).

Numerics follow the reference: the residual stream, norms, modulation, time embedding, audio
encoder and head run in float32; matmuls and attention run in the weights' dtype (bf16 on GPU).
Speed choices (why the code looks the way it does; the attention's are in model/attention.py):
RoPE tables built once per shape and kept on the device; modulation applied per token group into
preallocated buffers (no full-length concatenation of modulation tensors); both CFG branches can
run as one batch of 2; no host synchronisation in `forward`.

This module holds the blocks, the head and the model; the attention and its RoPE tables are in
model/attention.py, the audio encoder, audio injection and FramePack in model/conditioning.py, the
float32 layers in model/layers.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model.attention import ATTENTION_KERNELS, Attention, KVHook, attention_backends, fa4_unavailable, rope_table
from model.conditioning import AudioInjector, CausalAudioEncoder, FramePack, audio_injection, official_injector_map
from model.config import S2VConfig
from model.layers import FP32LayerNorm, _linear32

__all__ = ["WanS2VTransformer", "randomize_"]


# A token group: tokens [start, end) share one modulation row set `mod` [B or 1, 6, D] (float32).
TokenGroups = list[tuple[int, int, Tensor]]


def _modulate(normed: Tensor, groups: TokenGroups, shift_i: int, scale_i: int, dtype: torch.dtype) -> Tensor:
    """normed * (1 + scale) + shift per token group, as `dtype`.

    Eager: written group by group into one preallocated buffer (no full-length copies of the
    modulation). Under torch.compile the plain expression, which Inductor fuses into one kernel.
    """
    if torch.compiler.is_compiling():
        parts = [
            normed[:, start:end] * (1 + mod[:, scale_i : scale_i + 1]) + mod[:, shift_i : shift_i + 1]
            for start, end, mod in groups
            if end > start
        ]
        return torch.cat(parts, dim=1).to(dtype)
    out = torch.empty(normed.shape, dtype=dtype, device=normed.device)
    for start, end, mod in groups:
        if end > start:
            shift = mod[:, shift_i : shift_i + 1]
            scale = mod[:, scale_i : scale_i + 1]
            torch.addcmul(shift, normed[:, start:end], 1 + scale, out=out[:, start:end])
    return out


def _gated_add(x: Tensor, y: Tensor, groups: TokenGroups, gate_i: int) -> Tensor:
    """x + y * gate per token group: in place on the float32 residual stream in eager mode,
    functional under torch.compile (Inductor writes the result in one pass either way)."""
    if torch.compiler.is_compiling():
        parts = [y[:, start:end] * mod[:, gate_i : gate_i + 1] for start, end, mod in groups if end > start]
        return x + torch.cat(parts, dim=1)
    for start, end, mod in groups:
        if end > start:
            x[:, start:end].addcmul_(y[:, start:end], mod[:, gate_i : gate_i + 1])
    return x


def _add(x: Tensor, y: Tensor) -> Tensor:
    return x + y if torch.compiler.is_compiling() else x.add_(y)


# Fuse the feed-forward's bias and tanh GELU into the first GEMM's epilogue on CUDA (cuBLASLt,
# through torch._addmm_activation, which Inductor calls as it is): its 13824-wide activation is
# then written once instead of written, read and written again (see docs/benchmarks.md).
FFN_GELU_EPILOGUE = True


def feed_forward(ffn: nn.Sequential, x: Tensor) -> Tensor:
    """ffn = (Linear, GELU(tanh), Linear) applied to x [B, S, D]."""
    up, down = ffn[0], ffn[2]
    half = x.dtype in (torch.bfloat16, torch.float16)
    if not (FFN_GELU_EPILOGUE and x.is_cuda and half and type(up) is nn.Linear and up.bias is not None):
        return ffn(x)
    hidden = torch._addmm_activation(up.bias, x.reshape(-1, x.shape[-1]), up.weight.t(), use_gelu=True)
    return down(hidden.view(*x.shape[:-1], -1))


class S2VBlock(nn.Module):
    """One transformer block: modulated self-attention with RoPE, cross-attention to the text,
    modulated feed-forward (the official WanS2VAttentionBlock)."""

    def __init__(self, cfg: S2VConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.eps = cfg.eps
        self.self_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else None
        self.cross_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self, x: Tensor, context: Tensor, temb: TokenGroups, rope: Tensor, kv_cache: KVHook | None = None
    ) -> Tensor:
        """x [B, S, D] float32 (updated in place in eager mode; use the returned tensor); context [B, L, D]; temb: token
        groups with their time projection [B or 1, 6, D]; rope [S, 1, D/H, 2]; kv_cache: see Attention."""
        dtype = context.dtype
        dim = (x.shape[-1],)
        modulation = self.modulation.float()
        groups = [(start, end, mod + modulation) for start, end, mod in temb]
        # order of the six rows: shift, scale, gate (attention); shift, scale, gate (ffn)
        h = _modulate(F.layer_norm(x, dim, eps=self.eps), groups, 0, 1, dtype)
        x = _gated_add(x, self.self_attn(h, rope=rope, kv_cache=kv_cache), groups, 2)
        h = self.norm3(x) if self.norm3 is not None else x
        x = _add(x, self.cross_attn(h.to(dtype), context))
        h = _modulate(F.layer_norm(x, dim, eps=self.eps), groups, 3, 4, dtype)
        return _gated_add(x, feed_forward(self.ffn, h), groups, 5)


class Head(nn.Module):
    """Final modulated norm and projection to patches (the official Head_S2V), in float32."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, S, D] float32, e [B, D] float32 (time embedding) -> [B, S, out * prod(patch)]."""
        mod = self.modulation.float() + e[:, None]
        h = torch.addcmul(mod[:, 0:1], F.layer_norm(x, (x.shape[-1],), eps=self.eps), 1 + mod[:, 1:2])
        return _linear32(self.head, h)


def sinusoidal_embedding(dim: int, t: Tensor) -> Tensor:
    """[N] timesteps -> [N, dim] (cos | sin), computed in float64 like the reference."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    arg = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).float()


# ---------------------------------------------------------------------------------------------
# the model


class WanS2VTransformer(nn.Module):
    """Wan2.2-S2V diffusion transformer; state_dict keys and shapes equal the official checkpoint.

    Call::

        velocity = model(
            latents,          # [B, 16, F, H, W]  noisy video latents of the clip (F=20 for 80 frames)
            timestep,         # [B] or [1] or scalar, flow-matching timestep in [0, 1000]
            context,          # [B, L, text_dim] umT5 embeddings, L <= text_len (zero-padded inside)
            ref_latents,      # [B, 16, 1, H, W]  VAE latent of the reference image
            audio,            # [B, audio_num_layers, audio_dim, T_a] wav2vec2 hidden states of the
                              #   clip's video frames (T_a = infer_frames = 4*F for the default clip)
            motion_latents,   # [B, 16, T_m, H, W] latents of the last 73 video frames (T_m=19), or
                              #   None; ignored (no motion tokens) when drop_motion_frames=True
            pose_latents,     # [B, 16, F, H, W] VAE latents of the pose video, or None (zeros)
            drop_motion_frames=False,  # True on a first clip (the reference's drop_first_motion)
            add_last_motion=2,         # FramePack: 2 all, 1 without the newest frame, 0 only 4x
        )                     # -> [B, 16, F, H, W] float32

    Any conditioning input may have batch 1 and is then shared by all B rows. Classifier-free
    guidance as one batch of 2: row 0 = (context, audio), row 1 = (negative context, audio * 0),
    same latents/ref/motion/pose; then `uncond + scale * (cond - uncond)` on the two output rows.
    Wrong shapes raise ValueError naming the argument and the expected shape.
    """

    def __init__(self, config: S2VConfig) -> None:
        super().__init__()
        cfg = config
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([S2VBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)
        if cfg.cond_dim > 0:
            self.cond_encoder = nn.Conv3d(cfg.cond_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.casual_audio_encoder = CausalAudioEncoder(
            cfg.audio_dim, cfg.audio_num_layers, dim, cfg.num_audio_token, cfg.enable_adain
        )
        self.audio_injector = AudioInjector(cfg)
        self.trainable_cond_mask = nn.Embedding(3, dim)
        if cfg.enable_framepack:
            self.frame_packer = FramePack(cfg.in_dim, dim, cfg.zip_frame_buckets, cfg.framepack_drop_mode)
        _, self._injector_of_block = official_injector_map(cfg)
        self._rope_cache: dict[tuple, Tensor] = {}
        self._audio_injection = audio_injection  # compiled by compile_blocks

    # ---- helpers ----------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of matmuls and attention: the weights' dtype (bf16 for fp8-stored weights)."""
        dtype = self.text_embedding[0].weight.dtype
        return torch.bfloat16 if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else dtype

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile each block (fuses norms, modulation and RoPE around the matmuls) and the
        audio injection; what is already compiled is left as it is. The blocks share one compiled
        graph per token layout, the injectors one graph."""
        # One graph per layout: exact mode's clips of each size (first / later, CFG batch or not)
        # and the causal model's (rows, filled ring) layouts, ~8 more, share the blocks' code; past
        # torch's default limit of 8 a layout would silently run uncompiled.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in self.blocks:
            if getattr(block, "_compiled_call_impl", None) is None:
                block.compile(**kwargs)
        if self._audio_injection is audio_injection:  # one graph for all injectors (modules are inputs)
            self._audio_injection = torch.compile(audio_injection, **kwargs)

    def set_attention(self, kernel: str, device: torch.device | str | None = None) -> None:
        """Choose the self-attention kernel: "sdpa" (default) or "fa4" (see ATTENTION_KERNELS).

        Raises ValueError when the kernel cannot run on `device` (default: where the weights are),
        i.e. no Hopper/Blackwell GPU or no flash-attn-4 package, before any forward is attempted."""
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel {kernel!r}: expected one of {', '.join(ATTENTION_KERNELS)}")
        if kernel == "fa4":
            reason = fa4_unavailable(torch.device(device) if device else self.patch_embedding.weight.device)
            if reason:
                raise ValueError(reason)
        for block in self.blocks:
            block.self_attn.kernel = kernel

    @property
    def attention(self) -> str:
        """The self-attention kernel in use ("sdpa" or "fa4")."""
        return self.blocks[0].self_attn.kernel if len(self.blocks) else "sdpa"

    def _rope(self, segments: list, device: torch.device) -> Tensor:
        key = (tuple(segments), str(device))
        table = self._rope_cache.get(key)
        if table is None:
            table = rope_table(self.config.head_dim, segments).to(device)
            self._rope_cache[key] = table
        return table

    def _check_inputs(
        self,
        latents,
        timestep,
        context,
        ref_latents,
        audio,
        motion_latents,
        pose_latents,
        drop_motion_frames,
        add_last_motion,
    ) -> None:
        cfg = self.config
        _expect("latents", latents, ("B", cfg.in_dim, "F", "H", "W"), None)
        b, _, f, h, w = latents.shape
        weights_on = self.patch_embedding.weight.device
        if latents.device != weights_on and weights_on.type != "meta":
            raise ValueError(f"latents: on {latents.device} but the model is on {weights_on}")
        p = cfg.patch_size
        if f % p[0] or h % p[1] or w % p[2]:
            raise ValueError(f"latents: F, H, W = {f}, {h}, {w} must be multiples of the patch size {p}")
        _expect("ref_latents", ref_latents, ("B", cfg.in_dim, 1, h, w), b)
        _expect("context", context, ("B", "L", cfg.text_dim), b, " umT5 embeddings")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context: {context.shape[1]} tokens, more than text_len {cfg.text_len}")
        _expect("audio", audio, ("B", cfg.audio_num_layers, cfg.audio_dim, "T"), b, " wav2vec2 hidden states")
        frames = self.audio_latent_frames(audio.shape[3])
        if frames != f // p[0]:
            raise ValueError(
                f"audio: {audio.shape[3]} frames of features give {frames} latent frames but latents have "
                f"{f // p[0]}; pass the features of the clip's {4 * f} video frames"
            )
        if pose_latents is not None:
            if cfg.cond_dim <= 0:
                raise ValueError("pose_latents: this model has no pose condition (cond_dim = 0)")
            _expect("pose_latents", pose_latents, ("B", cfg.cond_dim, f, h, w), b)
        if motion_latents is not None and not drop_motion_frames:
            _expect("motion_latents", motion_latents, ("B", cfg.in_dim, "T_m", h, w), b)
            if h < 8 or w < 8:
                raise ValueError(f"motion_latents: FramePack needs latents of at least 8x8, got {h}x{w}")
        if add_last_motion not in (0, 1, 2):
            raise ValueError(f"add_last_motion: expected 0, 1 or 2, got {add_last_motion!r}")
        t = torch.as_tensor(timestep)
        if t.ndim > 1 or t.numel() not in (1, b):
            raise ValueError(f"timestep: expected a scalar or [{b}] or [1], got {_shape(t)}")

    def audio_latent_frames(self, audio_frames: int) -> int:
        """Latent frames the audio encoder makes of `audio_frames` feature frames (the clip is
        prefixed with `motion_frames` copies of its first frame, then those are cut off)."""
        n = audio_frames + self.config.motion_frames
        for _ in range(2):  # two stride-2 causal convolutions
            n = (n - 1) // 2 + 1
        return n - self.config.lat_motion_frames

    def encode_audio(self, audio: Tensor) -> tuple[Tensor | None, Tensor]:
        """[B, layers, C_a, T] -> (global [B, F, 1, D] | None, local [B, F, n+1, D]), float32."""
        lead = audio[..., :1].expand(*audio.shape[:3], self.config.motion_frames)
        glob, local = self.casual_audio_encoder(torch.cat([lead, audio], dim=-1))
        cut = self.config.lat_motion_frames
        return (glob[:, cut:] if glob is not None else None), local[:, cut:]

    # ---- forward ----------------------------------------------------------------------------
    def forward(
        self,
        latents: Tensor,
        timestep: Tensor | float,
        context: Tensor,
        ref_latents: Tensor,
        audio: Tensor,
        motion_latents: Tensor | None = None,
        pose_latents: Tensor | None = None,
        *,
        drop_motion_frames: bool = False,
        add_last_motion: int = 2,
    ) -> Tensor:
        """See the class docstring for shapes. Returns the velocity [B, out_dim, F, H, W] float32."""
        cfg = self.config
        self._check_inputs(
            latents,
            timestep,
            context,
            ref_latents,
            audio,
            motion_latents,
            pose_latents,
            drop_motion_frames,
            add_last_motion,
        )
        with attention_backends(latents.device):
            device = latents.device
            b, _, frames, lat_h, lat_w = latents.shape
            p = cfg.patch_size
            f, h, w = frames // p[0], lat_h // p[1], lat_w // p[2]
            add_last_motion = int(cfg.add_last_motion) * add_last_motion
            use_motion = cfg.enable_framepack and motion_latents is not None and not drop_motion_frames

            # tokens: video (+ pose), reference, motion, each plus its cond-mask vector
            parts = [self.video_tokens(latents, pose_latents), self.reference_tokens(ref_latents).expand(b, -1, -1)]
            if use_motion:
                parts.append(self.motion_tokens(motion_latents, add_last_motion).expand(b, -1, -1))
            x = torch.cat(parts, dim=1)
            n_vid, seq = f * h * w, x.shape[1]

            # RoPE: video at frames 0..f-1, reference at frame 30, motion at negative frames
            segments = [((0, 0, 0), (f, h, w), (f, h, w)), ((30, 0, 0), (31, h, w), (1, h, w))]
            if use_motion:
                segments += self.frame_packer.segments(lat_h, lat_w, add_last_motion)
            rope = self._rope(segments, device)

            # time: video tokens at t, reference and motion tokens at 0 (zero_timestep)
            t = torch.as_tensor(timestep, device=device).reshape(-1).float().expand(b)
            if cfg.zero_timestep:
                t = torch.cat([t, t.new_zeros(1)])
            e, e0 = self.time_modulation(t)
            temb = [(0, n_vid, e0[:b]), (n_vid, seq, e0[b:])] if cfg.zero_timestep else [(0, seq, e0)]

            x = self.run_blocks(x, self.text_context(context, b), temb, rope, h * w, self.encode_audio(audio))
            return self.unpatchify(self.head(x[:, :n_vid], e[:b]), f, h, w)

    # ---- the pieces of a forward (shared with the causal model, model/causal.py) --------------
    def video_tokens(self, latents: Tensor, pose_latents: Tensor | None) -> Tensor:
        """[B, 16, F, H, W] noisy latents (+ pose latents) -> float32 tokens [B, F*h*w, D] with the
        video's cond-mask vector."""
        dtype = self.compute_dtype
        vid = self.patch_embedding(latents.to(dtype))
        if self.config.cond_dim > 0:
            if pose_latents is not None:
                vid = vid + self.cond_encoder(pose_latents.to(dtype))
            else:  # the encoder of an all-zero pose video is its bias
                vid = vid + self.cond_encoder.bias.to(dtype)[:, None, None, None]
        return vid.flatten(2).transpose(1, 2).float() + self.trainable_cond_mask.weight[0].float()

    def reference_tokens(self, ref_latents: Tensor) -> Tensor:
        """[B, 16, 1, H, W] -> float32 tokens [B, h*w, D] with the reference's cond-mask vector."""
        ref = self.patch_embedding(ref_latents.to(self.compute_dtype)).flatten(2).transpose(1, 2)
        return ref.float() + self.trainable_cond_mask.weight[1].float()

    def motion_tokens(self, motion_latents: Tensor, add_last_motion: int) -> Tensor:
        """[B, 16, T_m, H, W] -> float32 FramePack tokens [B, N, D] with the motion's cond-mask vector."""
        mot = self.frame_packer(motion_latents.to(self.compute_dtype), add_last_motion)
        return mot.float() + self.trainable_cond_mask.weight[2].float()

    def time_modulation(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Timesteps [N] -> (time embedding [N, D], its six modulation rows [N, 6, D]), float32."""
        e = _linear32(self.time_embedding[0], sinusoidal_embedding(self.config.freq_dim, t))
        e = _linear32(self.time_embedding[2], F.silu(e))
        return e, _linear32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.config.dim))

    def text_context(self, context: Tensor, batch: int) -> Tensor:
        """umT5 embeddings [B or 1, L, text_dim] -> [batch, text_len, D], zero-padded like the reference."""
        cfg = self.config
        if context.shape[1] < cfg.text_len:
            context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        return self.text_embedding(context.to(self.compute_dtype)).expand(batch, -1, -1)

    def run_blocks(
        self,
        x: Tensor,
        ctx: Tensor,
        temb: TokenGroups,
        rope: Tensor,
        frame_tokens: int,
        audio: tuple[Tensor | None, Tensor] | None,
        kv_caches: list[KVHook] | None = None,
    ) -> Tensor:
        """The blocks over x [B, S, D] float32. After the injection blocks the first F x
        `frame_tokens` tokens (the video's F latent frames) cross-attend to their frame's audio
        tokens (`audio` as `encode_audio` returns it, F of its frames; None: no injection).
        kv_caches: one hook per block for the self-attention (see Attention)."""
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, temb, rope, kv_cache=kv_caches[i] if kv_caches is not None else None)
            if audio is not None and i in self._injector_of_block:
                self._inject_audio(self._injector_of_block[i], x, frame_tokens, audio[0], audio[1])
        return x

    def unpatchify(self, out: Tensor, f: int, h: int, w: int) -> Tensor:
        """Head output [B, f*h*w, out_dim * prod(patch)] -> [B, out_dim, F, H, W] float32."""
        p, c, b = self.config.patch_size, self.config.out_dim, out.shape[0]
        out = out.view(b, f, h, w, p[0], p[1], p[2], c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, c, f * p[0], h * p[1], w * p[2])

    def _inject_audio(self, idx: int, x: Tensor, frame_tokens: int, glob: Tensor | None, local: Tensor) -> None:
        """x[:, :n_vid] += per-frame cross-attention of each latent frame's video tokens to its audio
        tokens (local [B or 1, F, n, D]; n_vid = F x frame_tokens)."""
        inj = self.audio_injector
        b, f = x.shape[0], local.shape[1]
        n_vid = f * frame_tokens
        vid = x[:, :n_vid].reshape(b * f, frame_tokens, x.shape[-1])
        adain = cond = None
        if self.config.enable_adain and self.config.adain_mode == "attn_norm":
            adain = inj.injector_adain_layers[idx]
            cond = glob[:, :, 0].expand(b, -1, -1).flatten(0, 1)
        tokens = local.expand(b, -1, -1, -1).flatten(0, 1).to(self.compute_dtype)
        res = self._audio_injection(inj.injector[idx], adain, vid, cond, tokens)
        x[:, :n_vid] += res.view(b, n_vid, -1)


@torch.no_grad()
def randomize_(model: WanS2VTransformer, seed: int = 0, std: float = 0.05) -> WanS2VTransformer:
    """Give every parameter non-trivial random values (in place), for tests and benchmarks.

    Default init leaves some tensors at exact zeros/ones (padding tokens, norm weights, biases),
    which would hide mistakes in the paths they feed; this adds N(0, std) noise to all of them.
    The audio layer weights get values in [0.5, 1.5] so their normalising sum stays away from 0.
    Works on any device (the noise is drawn on CPU from `seed`, so results do not depend on it).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name == "casual_audio_encoder.weights":
            noise = torch.rand(param.shape, generator=gen) + 0.5
            param.copy_(noise)
            continue
        noise = torch.randn(param.shape, generator=gen) * std
        param.add_(noise.to(device=param.device, dtype=param.dtype))
    return model


def _expect(name: str, x: object, dims: tuple, batch: int | None, what: str = "") -> None:
    """Raise ValueError unless x is a tensor of shape `dims`: ints must match, "B" is the batch
    (`batch` or 1; anything if batch is None), other strings are free sizes."""
    ok = isinstance(x, Tensor) and x.ndim == len(dims)
    if ok:
        for size, want in zip(x.shape, dims, strict=True):
            if isinstance(want, int) and size != want or want == "B" and batch is not None and size not in (1, batch):
                ok = False
    if not ok:
        desc = ", ".join(f"{batch} or 1" if d == "B" and batch is not None else str(d) for d in dims)
        raise ValueError(f"{name}: expected [{desc}]{what}, got {_shape(x)}")


def _shape(x: object) -> str:
    return str(list(x.shape)) if isinstance(x, Tensor) else type(x).__name__
