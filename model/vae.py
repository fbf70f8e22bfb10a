"""The Wan2.1 video VAE through diffusers' `AutoencoderKLWan`, loaded from Wan's own layout.

`Wan2.1_VAE.pth` (and ComfyUI's `wan_2.1_vae.safetensors`, which keeps the same key names) name
modules as `wan/modules/vae2_1.py` builds them; diffusers groups them differently. Mapping (no
attention inside the down/up stacks, as in Wan2.1):

    conv1 / conv2                               -> quant_conv / post_quant_conv
    {encoder,decoder}.conv1                     -> {encoder,decoder}.conv_in
    {encoder,decoder}.middle.{0,2}.residual.*   -> {..}.mid_block.resnets.{0,1}.*
    {encoder,decoder}.middle.1.*                -> {..}.mid_block.attentions.0.*
    {encoder,decoder}.head.{0,2}                -> {..}.norm_out / conv_out
    encoder.downsamples.k.*                     -> encoder.down_blocks.k.*   (same flat order)
    decoder.upsamples.k.*  (flat: per level num_res_blocks+1 residual blocks, then one resample)
                                                -> decoder.up_blocks.L.resnets.j.* / up_blocks.L.upsamplers.0.*
    inside residual blocks: residual.0 -> norm1, residual.2 -> conv1, residual.3 -> norm2,
                            residual.6 -> conv2, shortcut -> conv_shortcut

Latents are normalised as the reference does: encode gives (mu - mean) * (1 / std), decode takes
z / (1 / std) + mean, clamped to [-1, 1]. The model runs in float32 like the reference.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file

from model.checkpoint import build_on_meta
from model.layout import CheckpointError
from model.timing import LoadTimings, phase

LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
STRIDE = (4, 8, 8)

_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2"}
_FIXED = {
    "conv1": "quant_conv",
    "conv2": "post_quant_conv",
    "encoder.conv1": "encoder.conv_in",
    "decoder.conv1": "decoder.conv_in",
    "encoder.head.0": "encoder.norm_out",
    "encoder.head.2": "encoder.conv_out",
    "decoder.head.0": "decoder.norm_out",
    "decoder.head.2": "decoder.conv_out",
    "encoder.middle.1": "encoder.mid_block.attentions.0",
    "decoder.middle.1": "decoder.mid_block.attentions.0",
}


def _residual_part(rest: str) -> str:
    """'residual.2.weight' -> 'conv1.weight', 'shortcut.bias' -> 'conv_shortcut.bias', else unchanged."""
    for old, new in _RESIDUAL.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    if rest.startswith("shortcut."):
        return "conv_shortcut" + rest[len("shortcut") :]
    return rest


def _prefix_rename(key: str, table: dict[str, str]) -> str | None:
    """Rename `key` if it lies under one of the module prefixes in `table`, else None."""
    for old, new in table.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    return None


def _structure(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(levels, num_res_blocks) of a Wan-layout VAE, read from its decoder stack."""
    enc_resamples = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.downsamples\.(\d+)\.resample\.", k))}
    levels = len(enc_resamples) + 1
    dec_blocks = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.upsamples\.(\d+)\.", k))}
    num_res_blocks = (len(dec_blocks) - (levels - 1)) // levels - 1
    return levels, num_res_blocks


def wan_to_diffusers_vae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan2.1 VAE state dict to `AutoencoderKLWan` names (KeyError on an unknown key)."""
    levels, num_res_blocks = _structure(state)
    per_level = num_res_blocks + 2  # residual blocks, then a resample (absent on the last level)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if fixed := _prefix_rename(key, _FIXED):
            out[fixed] = value
        elif m := re.match(r"(encoder|decoder)\.middle\.([02])\.(.+)$", key):
            out[f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) // 2}.{_residual_part(m.group(3))}"] = value
        elif m := re.match(r"encoder\.downsamples\.(\d+)\.(.+)$", key):
            out[f"encoder.down_blocks.{m.group(1)}.{_residual_part(m.group(2))}"] = value
        elif m := re.match(r"decoder\.upsamples\.(\d+)\.(.+)$", key):
            level, pos = divmod(int(m.group(1)), per_level)
            if level >= levels:
                raise KeyError(key)
            if pos <= num_res_blocks:
                out[f"decoder.up_blocks.{level}.resnets.{pos}.{_residual_part(m.group(2))}"] = value
            else:
                out[f"decoder.up_blocks.{level}.upsamplers.0.{m.group(2)}"] = value
        else:
            raise KeyError(key)
    return out


def diffusers_to_wan_vae(state: dict[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    """The inverse of `wan_to_diffusers_vae` (used to write test checkpoints in Wan's layout)."""
    back_fixed = {v: k for k, v in _FIXED.items()}
    back_res = {v: k for k, v in _RESIDUAL.items()} | {"conv_shortcut": "shortcut"}

    def res(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return f"{back_res.get(head, head)}.{tail}"

    per_level = num_res_blocks + 2
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if fixed := _prefix_rename(key, back_fixed):
            out[fixed] = value
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)$", key):
            out[f"{m.group(1)}.middle.{int(m.group(2)) * 2}.{res(m.group(3))}"] = value
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.+)$", key):
            out[f"encoder.downsamples.{m.group(1)}.{res(m.group(2))}"] = value
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
            out[f"decoder.upsamples.{int(m.group(1)) * per_level + int(m.group(2))}.{res(m.group(3))}"] = value
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", key):
            out[f"decoder.upsamples.{int(m.group(1)) * per_level + num_res_blocks + 1}.{m.group(2)}"] = value
        else:
            raise KeyError(key)
    return out


def vae_config_from_wan(state: dict[str, torch.Tensor]) -> dict:
    """`AutoencoderKLWan` arguments implied by a Wan-layout state dict's shapes."""
    levels, num_res_blocks = _structure(state)
    base = int(state["encoder.conv1.weight"].shape[0])
    dim_mult = [
        int(state[f"encoder.downsamples.{lvl * (num_res_blocks + 1)}.residual.2.weight"].shape[0]) // base
        for lvl in range(levels)
    ]
    temporal = [
        f"encoder.downsamples.{lvl * (num_res_blocks + 1) + num_res_blocks}.time_conv.weight" in state
        for lvl in range(levels - 1)
    ]
    return {
        "base_dim": base,
        "z_dim": int(state["conv2.weight"].shape[0]),
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": temporal,
    }


def load_vae_state(path: Path) -> dict[str, torch.Tensor]:
    """Read `Wan2.1_VAE.pth` (weights only, memory-mapped) or ComfyUI's `.safetensors` of the same layout."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the VAE checkpoint ({exc}); download it again") from exc
    if not isinstance(state, dict) or "encoder.conv1.weight" not in state or "conv2.weight" not in state:
        raise CheckpointError(
            f"{path}: not a Wan2.1 VAE state dict (expected keys 'encoder.conv1.weight', "
            "'encoder.downsamples.N...', 'decoder.upsamples.N...', 'conv1.weight', 'conv2.weight')"
        )
    if (z := state["conv2.weight"].shape[0]) != len(LATENT_MEAN):
        raise CheckpointError(
            f"{path}: a {z}-channel VAE (the Wan2.2 VAE of the TI2V 5B?), not the 16-channel Wan2.1 VAE that "
            "Wan2.2-S2V uses; use Wan2.1_VAE.pth or ComfyUI's wan_2.1_vae.safetensors"
        )
    return state


class WanVAE:
    """Encode pixels in [-1, 1] to normalised latents and back; float32 like the reference."""

    def __init__(self, model: AutoencoderKLWan, device: torch.device | str = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        z = model.config.z_dim
        if z != len(LATENT_MEAN):
            raise CheckpointError(f"VAE has {z} latent channels; Wan2.1 normalisation needs {len(LATENT_MEAN)}")
        self._mean = torch.tensor(LATENT_MEAN, dtype=torch.float32).view(1, z, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(LATENT_STD, dtype=torch.float32).view(1, z, 1, 1, 1)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: torch.device | str = "cpu", timings: LoadTimings | None = None
    ) -> WanVAE:
        path = Path(path)
        with phase(timings, "read"):
            # float32 like the reference (the released file is float32; ComfyUI's may be bf16)
            state = {k: v.float() for k, v in load_vae_state(path).items()}
        with phase(timings, "build"):
            try:
                config = vae_config_from_wan(state)
                converted = wan_to_diffusers_vae(state)
            except KeyError as exc:
                raise CheckpointError(f"{path}: unexpected key {exc} for a Wan2.1 VAE") from exc
            model = build_on_meta(lambda: AutoencoderKLWan(**config), converted, path, "a Wan2.1 VAE")
        with phase(timings, "to_device", device):
            return cls(model, device)

    @property
    def device(self) -> torch.device:
        return self.model.quant_conv.weight.device

    def to(self, device: torch.device | str) -> WanVAE:
        self.model.to(device)
        return self

    def enable_tiling(
        self, tile: int | tuple[int, int] = (480, 832), stride: int | tuple[int, int] = (384, 704)
    ) -> None:
        """Spatial tiling (diffusers' blending) to cap decode memory at 720p on small GPUs.

        tile / stride: pixels, (height, width) or one number for both. Frames no larger than a
        tile are not tiled: the default leaves 480x832 clips exactly as without tiling and
        decodes 720x1280 ones in 480x832 tiles overlapping by 96 / 128 pixels."""
        th, tw = (tile, tile) if isinstance(tile, int) else tile
        sh, sw = (stride, stride) if isinstance(stride, int) else stride
        self.model.enable_tiling(th, tw, sh, sw)

    def disable_tiling(self) -> None:
        self.model.disable_tiling()

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> normalised latents [B, 16, 1 + (T - 1) // 4, H / 8, W / 8]."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"VAE input must be [B, 3, T, H, W], got {tuple(video.shape)}")
        if video.shape[-2] % STRIDE[1] or video.shape[-1] % STRIDE[2]:
            raise ValueError(f"VAE input height/width must be multiples of 8, got {tuple(video.shape[-2:])}")
        x = video.to(self.device, torch.float32)
        mu = self.model.encode(x).latent_dist.mode()
        return (mu - self._mean.to(mu.device)) * self._inv_std.to(mu.device)

    @torch.no_grad()
    def encode_still(self, image: torch.Tensor, num_frames: int) -> torch.Tensor:
        """`encode` of a video holding `image` [B, 3, 1, H, W] for `num_frames` frames, bit for bit,
        without running every frame (LiveAvatar's motion condition is 365 copies of the reference).

        The encoder is causal: it reads the video as its first frame, then chunks of 4, carrying
        a few frames of features per layer from chunk to chunk, and gives one latent a chunk. Once
        a chunk's latent and every carried feature equal the chunk before's, the next chunk meets
        the same inputs in the same state, so it and every later one repeat that latent exactly;
        the loop stops there (a few dozen chunks at most: the encoder's depth in time). The
        repeated latents then go through the same final convolution, on the same shape, as in
        `encode`. Falls back to `encode` where the encode would be tiled or sliced. The loop mirrors
        diffusers' AutoencoderKLWan._encode (written here: diffusers has no early exit)."""
        model = self.model
        if image.ndim != 5 or image.shape[1] != 3 or image.shape[2] != 1 or num_frames < 1:
            raise ValueError(f"encode_still takes one frame [B, 3, 1, H, W] and num_frames >= 1, got "
                             f"{tuple(image.shape)} and {num_frames}")  # fmt: skip
        if image.shape[-2] % STRIDE[1] or image.shape[-1] % STRIDE[2]:
            raise ValueError(f"VAE input height/width must be multiples of 8, got {tuple(image.shape[-2:])}")
        video = image.to(self.device, torch.float32).expand(-1, -1, num_frames, -1, -1).contiguous()
        tiled = model.use_tiling and (
            video.shape[-1] > model.tile_sample_min_width or video.shape[-2] > model.tile_sample_min_height
        )
        if (
            (num_frames - 1) % 4
            or tiled
            or model.config.patch_size is not None
            or (model.use_slicing and video.shape[0] > 1)
        ):
            return self.encode(video)
        chunks = 1 + (num_frames - 1) // 4
        model.clear_cache()
        outs: list[torch.Tensor] = []
        state: list = []
        for i in range(chunks):
            model._enc_conv_idx = [0]
            frames = video[:, :, :1] if i == 0 else video[:, :, 1 + 4 * (i - 1) : 1 + 4 * i]
            outs.append(model.encoder(frames, feat_cache=model._enc_feat_map, feat_idx=model._enc_conv_idx))
            if i >= 2 and torch.equal(outs[-1], outs[-2]) and _same_features(model._enc_feat_map, state):
                outs += [outs[-1]] * (chunks - 1 - i)
                break
            state = [f.clone() if isinstance(f, torch.Tensor) else f for f in model._enc_feat_map]
        model.clear_cache()
        self.still_chunks = i + 1  # chunks the last call ran (of `chunks`)
        h = model.quant_conv(torch.cat(outs, dim=2))
        mu = DiagonalGaussianDistribution(h).mode()
        return (mu - self._mean.to(mu.device)) * self._inv_std.to(mu.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, t, h, w] -> pixels [B, 3, 1 + 4 (t - 1), 8h, 8w] in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != self._mean.shape[1]:
            raise ValueError(f"latents must be [B, {self._mean.shape[1]}, t, h, w], got {tuple(latents.shape)}")
        z = latents.to(self.device, torch.float32)
        z = z / self._inv_std.to(z.device) + self._mean.to(z.device)
        return self.model.decode(z).sample.clamp_(-1.0, 1.0)


def _same_features(now: list, before: list) -> bool:
    """Whether the encoder's carried features equal a snapshot of them (tensors bit for bit)."""
    if len(now) != len(before):
        return False
    for a, b in zip(now, before, strict=True):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if isinstance(a, torch.Tensor) and not (a.shape == b.shape and torch.equal(a, b)):
            return False
        if not isinstance(a, torch.Tensor) and a != b:
            return False
    return True
