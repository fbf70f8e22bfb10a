"""The S2V transformer's audio and motion conditioning modules (checkpoint names kept).

- audio: `CausalAudioEncoder` turns wav2vec2 hidden states into per-latent-frame audio tokens
  (and a global vector for AdaIN); `AudioInjector` holds the cross-attentions that, after
  selected blocks, let each latent frame's video tokens attend to its audio tokens
  (`audio_injection`, compiled once for all injectors); `official_injector_map` replicates the
  reference's block -> injector mapping;
- motion: `FramePack` packs the last 19 latent frames of the video so far into motion tokens.

The speech itself is encoded by model/audio_encoder.py; the modules here are the transformer's own
(`WanS2VTransformer` in model/transformer.py builds and calls them).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model.attention import Attention
from model.config import S2VConfig
from model.layers import _linear32

# ---------------------------------------------------------------------------------------------
# audio path


class CausalConv1d(nn.Module):
    """Conv1d padded on the left by replicating the first step (no look-ahead)."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(chan_in, chan_out, kernel_size, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (self.pad, 0), mode="replicate")
        return F.conv1d(x, self.conv.weight.to(x.dtype), self.conv.bias.to(x.dtype), stride=self.conv.stride)


class AudioFrameEncoder(nn.Module):
    """Compresses audio features 4x in time with causal convolutions into `num_tokens` local
    tokens (+ one learned padding token) and, for AdaIN, one global vector per latent frame.
    (The official MotionEncoder_tc; the two paths share conv2/conv3 and the norms.)"""

    def __init__(self, in_dim: int, hidden_dim: int, num_tokens: int, need_global: bool) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(in_dim, hidden_dim // 4 * num_tokens, 3, stride=1)
        self.conv1_global = CausalConv1d(in_dim, hidden_dim // 4, 3, stride=1) if need_global else None
        self.conv2 = CausalConv1d(hidden_dim // 4, hidden_dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(hidden_dim // 2, hidden_dim, 3, stride=2)
        self.final_linear = nn.Linear(hidden_dim, hidden_dim) if need_global else None
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))

    @staticmethod
    def _norm_act(x: Tensor) -> Tensor:
        """[N, C, T] -> LayerNorm over C (no affine) + SiLU -> [N, T, C]."""
        x = x.transpose(1, 2)
        return F.silu(F.layer_norm(x, (x.shape[-1],), eps=1e-6))

    def _compress(self, x: Tensor) -> Tensor:
        """[N, C/4, T] after conv1 -> [N, T', C]."""
        x = self.conv2(self._norm_act(x).transpose(1, 2))
        x = self.conv3(self._norm_act(x).transpose(1, 2))
        return self._norm_act(x)

    def forward(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """x [B, C_a, T] -> (global [B, T', 1, D] or None, local [B, T', num_tokens + 1, D])."""
        b = x.shape[0]
        local = self.conv1_local(x).unflatten(1, (self.num_tokens, -1)).flatten(0, 1)
        local = self._compress(local).unflatten(0, (b, self.num_tokens)).transpose(1, 2)
        pad = self.padding_tokens.to(local.dtype).expand(b, local.shape[1], 1, -1)
        local = torch.cat([local, pad], dim=2)
        if self.conv1_global is None:
            return None, local
        glob = _linear32(self.final_linear, self._compress(self.conv1_global(x)))
        return glob[:, :, None], local


class CausalAudioEncoder(nn.Module):
    """Weighted average over the wav2vec2 hidden states (softly learned weights), then the
    frame encoder; all in float32 (the official `casual_audio_encoder`, spelling kept)."""

    def __init__(self, audio_dim: int, num_layers: int, out_dim: int, num_tokens: int, need_global: bool) -> None:
        super().__init__()
        self.encoder = AudioFrameEncoder(audio_dim, out_dim, num_tokens, need_global)
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))

    def forward(self, features: Tensor) -> tuple[Tensor | None, Tensor]:
        """features [B, layers, C_a, T] -> (global [B, T', 1, D] | None, local [B, T', n+1, D])."""
        w = F.silu(self.weights.float())
        avg = (features.float() * w / w.sum(dim=1, keepdim=True)).sum(dim=1)
        return self.encoder(avg)


class AdaLayerNorm(nn.Module):
    """LayerNorm (eps 1e-5, no affine) shifted and scaled from a conditioning vector; the
    diffusers AdaLayerNorm with chunk_dim=1 (shift first) that the reference uses."""

    def __init__(self, dim: int, cond_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_dim, dim * 2)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x [N, S, D] float32, cond [N, D_c] -> [N, S, D] float32."""
        shift, scale = _linear32(self.linear, F.silu(cond.float())).chunk(2, dim=1)
        return torch.addcmul(shift[:, None], F.layer_norm(x, (x.shape[-1],), eps=1e-5), 1 + scale[:, None])


def audio_injection(
    attn: Attention, adain: AdaLayerNorm | None, vid: Tensor, cond: Tensor | None, tokens: Tensor
) -> Tensor:
    """One audio injection's residual: video tokens vid [N, S, D] float32 (N = batch x latent
    frames), normalised (AdaIN from cond [N, D] when given, else plain LayerNorm), cross-attend to
    that frame's audio tokens [N, n, D]; returned in the tokens' dtype."""
    h = adain(vid, cond) if adain is not None else F.layer_norm(vid, (vid.shape[-1],), eps=1e-6)
    return attn(h.to(tokens.dtype), context=tokens)


def official_injector_map(cfg: S2VConfig) -> tuple[int, dict[int, int]]:
    """(number of audio injectors, {block index: injector index}) exactly as the reference
    builds them: it matches the module name `transformer_blocks.{i}` by substring, so with 10 or
    more layers an id like 1 also matches blocks 10-19 (one extra injector each, and the last one
    wins). Replicated so any official config loads with strict keys; for the released 40-layer
    model this is the plain one-to-one mapping."""
    mapping: dict[int, int] = {}
    count = 0
    for block in range(cfg.num_layers):
        name = f"root.transformer_blocks.{block}"
        for layer in cfg.audio_inject_layers:
            if f"transformer_blocks.{layer}" in name:
                mapping[layer] = count
                count += 1
    return count, mapping


class AudioInjector(nn.Module):
    """Per-frame cross-attention of the video tokens to the audio tokens after selected blocks."""

    def __init__(self, cfg: S2VConfig) -> None:
        super().__init__()
        count, _ = official_injector_map(cfg)
        self.injector = nn.ModuleList([Attention(cfg.dim, cfg.num_heads, True, 1e-6) for _ in range(count)])
        if cfg.enable_adain:
            self.injector_adain_layers = nn.ModuleList([AdaLayerNorm(cfg.dim, cfg.dim) for _ in range(count)])
            if cfg.adain_mode != "attn_norm":
                # present in such checkpoints but unused by the reference forward
                self.injector_adain_output_layers = nn.ModuleList([nn.Linear(cfg.dim, cfg.dim) for _ in range(count)])


# ---------------------------------------------------------------------------------------------
# FramePack motion tokens


class FramePack(nn.Module):
    """Packs the last 19 motion latent frames into tokens at three rates: the newest frame at
    1x (patch 1x2x2), the next 2 at 2x (2x4x4), the oldest 16 at 4x (4x8x8); the official
    FramePackMotioner."""

    def __init__(self, in_dim: int, dim: int, buckets: tuple[int, ...], drop_mode: str) -> None:
        super().__init__()
        if tuple(buckets) != (1, 2, 16):
            raise ValueError(f"FramePack buckets must be (1, 2, 16) (fixed kernels), got {buckets}")
        self.buckets = tuple(buckets)
        self.drop_mode = drop_mode
        self.proj = nn.Conv3d(in_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_dim, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_dim, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def segments(self, lat_h: int, lat_w: int, add_last_motion: int) -> list[tuple[tuple, tuple, tuple]]:
        """RoPE grids (start, end, span) of the packed tokens, in token order (official values)."""
        b = self.buckets
        keep_post = not (add_last_motion < 2 and self.drop_mode == "drop")
        keep_2x = not (add_last_motion < 1 and self.drop_mode == "drop")
        segs = []
        if keep_post:
            segs.append(((-b[0], 0, 0), (-b[0] + b[0], lat_h // 2, lat_w // 2), (b[0], lat_h // 2, lat_w // 2)))
        if keep_2x:
            s = -(b[0] + b[1])
            segs.append(((s, 0, 0), (s + b[1] // 2, lat_h // 4, lat_w // 4), (b[1], lat_h // 2, lat_w // 2)))
        s = -sum(b)
        segs.append(((s, 0, 0), (s + b[2] // 4, lat_h // 8, lat_w // 8), (b[2], lat_h // 2, lat_w // 2)))
        return segs

    def forward(self, motion: Tensor, add_last_motion: int) -> Tensor:
        """motion [B, C, T_m, h, w] -> tokens [B, N, D] (the last sum(buckets) frames are used;
        fewer frames are zero-padded at the old end, as the reference)."""
        total = sum(self.buckets)
        n = min(total, motion.shape[2])
        padded = motion.new_zeros(motion.shape[0], motion.shape[1], total, *motion.shape[3:])
        padded[:, :, total - n :] = motion[:, :, motion.shape[2] - n :]
        if add_last_motion < 2 and self.drop_mode != "drop":
            zero_end = sum(self.buckets[: len(self.buckets) - add_last_motion - 1])
            padded[:, :, total - zero_end :] = 0
        old, mid, new = padded.split(list(self.buckets)[::-1], dim=2)
        parts = []
        if not (add_last_motion < 2 and self.drop_mode == "drop"):
            parts.append(self.proj(new))
        if not (add_last_motion < 1 and self.drop_mode == "drop"):
            parts.append(self.proj_2x(mid))
        parts.append(self.proj_4x(old))
        return torch.cat([p.flatten(2).transpose(1, 2) for p in parts], dim=1)
