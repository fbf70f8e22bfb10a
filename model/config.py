"""Configuration of the Wan2.2-S2V diffusion transformer.

`S2VConfig` holds every field of the official configuration (`wan/configs/wan_s2v_14B.py` and the
checkpoint's `config.json`, written by diffusers' `register_to_config` from `WanModel_S2V.__init__`),
with the official key names, so `from_json`/`to_json` read and write the checkpoint's own file.

Two presets: `S2VConfig.wan_14b()` (the released model) and `S2VConfig.tiny()` (same structure:
audio injection at several layers, AdaIN, FramePack, zero timestep; a few layers of small width, for
CPU tests in seconds).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys of the official config.json that describe the checkpoint but not the network (diffusers
# bookkeeping, training-time options); accepted on read, ignored.
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "architectures"}
# Alternative spellings seen in the official python config.
_ALIASES = {"trainable_token": "trainable_token_pos_emb"}


@dataclass(frozen=True)
class S2VConfig:
    """Every field of the official S2V transformer configuration (official key names).

    Fields the official `config.json` does not carry but the network needs are marked "ours";
    they default to the released model's values (`motion_frames`, `audio_num_layers`,
    `zip_frame_buckets`).
    """

    # backbone
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    num_heads: int = 40
    num_layers: int = 40
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    out_dim: int = 16
    text_len: int = 512
    text_dim: int = 4096
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    model_type: str = "s2v"
    # audio
    audio_dim: int = 1024
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    enable_adain: bool = True
    adain_mode: str = "attn_norm"
    audio_num_layers: int = 25  # ours: wav2vec2 hidden states averaged (24 layers + embeddings)
    # reference / motion / pose
    zero_init: bool = True
    zero_timestep: bool = True
    add_last_motion: bool = True
    enable_framepack: bool = True
    framepack_drop_mode: str = "padd"
    zip_frame_buckets: tuple[int, ...] = (1, 2, 16)  # ours: FramePack's fixed buckets
    motion_frames: int = 73
    cond_dim: int = 16
    enable_motioner: bool = False
    enable_tsm: bool = False
    trainable_token_pos_emb: bool = False
    motion_token_num: int = 1024
    # keys read from a config.json that this code does not know (kept for to_json round trips)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type != "s2v":
            raise ValueError(f"model_type must be 's2v', got {self.model_type!r}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into num_heads {self.num_heads} heads of even size")
        if self.enable_motioner:
            raise ValueError(
                "enable_motioner=True (the MotionerTransformers variant) is not implemented; "
                "the released Wan2.2-S2V-14B uses FramePack (enable_framepack=True)"
            )
        if not self.enable_framepack:
            raise ValueError(
                "enable_framepack=False (plain patch-embedded motion tokens) is not implemented; "
                "the released Wan2.2-S2V-14B uses FramePack"
            )
        if tuple(self.window_size) != (-1, -1):
            raise ValueError(f"window_size {self.window_size} not supported; the S2V model uses (-1, -1)")
        if self.framepack_drop_mode not in ("padd", "drop"):
            raise ValueError(f"framepack_drop_mode must be 'padd' or 'drop', got {self.framepack_drop_mode!r}")
        bad = [i for i in self.audio_inject_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"audio_inject_layers {bad} outside 0..{self.num_layers - 1}")
        if self.dim // 4 * 4 != self.dim:
            raise ValueError(f"dim {self.dim} must be a multiple of 4 (audio encoder widths)")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def lat_motion_frames(self) -> int:
        """Latent frames the VAE makes of `motion_frames` video frames (19 for 73)."""
        return (self.motion_frames + 3) // 4

    def latent_frames(self, infer_frames: int) -> int:
        """Latent frames of one clip of `infer_frames` video frames (20 for 80), as the reference."""
        return (infer_frames + 3 + self.motion_frames) // 4 - self.lat_motion_frames

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def wan_14b(cls) -> S2VConfig:
        """The released Wan2.2-S2V-14B transformer."""
        return cls()

    @classmethod
    def tiny(cls) -> S2VConfig:
        """Same architecture, tiny sizes: 3 layers of width 64 (2 heads of 32), audio injected
        after layers 0 and 2, AdaIN, FramePack, zero timestep. Text width 32 (a tiny umT5),
        audio width 32 over 3 hidden states (a tiny wav2vec2 with 2 layers).

        head_dim 32 keeps the 3-D RoPE split identical between the reference implementations.
        """
        return cls(
            dim=64,
            ffn_dim=128,
            freq_dim=32,
            num_heads=2,
            num_layers=3,
            text_len=32,
            text_dim=32,
            audio_dim=32,
            audio_inject_layers=(0, 2),
        )

    # ---- json ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> S2VConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            key = _ALIASES.get(key, key)
            if key in known:
                if isinstance(value, list):
                    value = tuple(value)
                kwargs[key] = value
            elif key not in _IGNORED_KEYS:
                extra[key] = value
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> S2VConfig:
        """Read an official `config.json` (unknown keys are kept in `extra`, not errors)."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of transformer settings")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"_class_name": "WanModel_S2V"}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        data.update(self.extra)
        return data

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
