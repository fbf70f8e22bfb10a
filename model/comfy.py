"""ComfyUI's single-file conventions: key prefixes, "scaled fp8" weights, and what a file is.

ComfyUI keeps each component of Wan2.2-S2V in one `.safetensors` file (its Wan2.2-S2V guide:
`wan2.2_s2v_14B_bf16.safetensors` / `_fp8_scaled`, `umt5_xxl_fp8_e4m3fn_scaled.safetensors`,
`wan_2.1_vae.safetensors`, `wav2vec2_large_english_fp16.safetensors`). Their key layouts, read
from ComfyUI's loaders (`comfy/model_detection.py`, `comfy/sd.py`, `comfy/text_encoders/t5.py`,
`comfy/audio_encoders/`, `comfy/ops.py`):

- DiT: the official keys, optionally under `model.diffusion_model.` (or `diffusion_model.`);
  ComfyUI tells S2V from the other Wan DiTs by `casual_audio_encoder.*`.
- umT5: transformers' T5 encoder names (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q`,
  `...layer.1.DenseReluDense.wi_0`, `encoder.final_layer_norm`), a position bias in every block
  (umT5; T5 has one in block 0 only), and usually the sentencepiece model as a uint8 tensor
  `spiece_model` (ComfyUI's tokenizer reads it from there).
- VAE: Wan's own names, as in `Wan2.1_VAE.pth`.
- wav2vec2: transformers' Wav2Vec2 names, optionally under `wav2vec2.` (the CTC head `lm_head.*`
  is ignored); the positional convolution as `weight_g`/`weight_v` or as torch's
  `parametrizations.weight.original0/1`.

"Scaled fp8" (`comfy/ops.py`): a linear weight stored as float8_e4m3fn next to a float32 scale
`<layer>.scale_weight` (newer files: `<layer>.weight_scale`); the real weight is
`weight.float() * scale`. A `scaled_fp8` tensor marks the file; `<layer>.scale_input` /
`input_scale` (activation scales for ComfyUI's fp8 matmuls) and `<layer>.comfy_quant` carry no
weights and are skipped.

This module reads only safetensors headers (`identify`) or whole files (`read_state`); it knows no
model classes, so every loader can use it. Which file is used for what is decided in layout.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
WAV2VEC_PREFIX = "wav2vec2."
SCALED_FP8 = "scaled_fp8"
SPIECE_MODEL = "spiece_model"  # the umT5 file's embedded sentencepiece model (uint8 bytes)
MARKER_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_HEADER_DTYPES = ("F8_E4M3", "F8_E5M2")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max

# keys only the S2V DiT has (ComfyUI recognises S2V by the first)
S2V_DIT_KEYS = ("casual_audio_encoder.encoder.final_linear.weight", "audio_injector.injector.0.q.weight",
                "cond_encoder.weight", "frame_packer.proj.weight")  # fmt: skip


def strip_prefix(key: str, prefixes: Iterable[str]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def is_marker(key: str) -> bool:
    """A key of a scaled-fp8 file that carries no weight of the model."""
    return key == SCALED_FP8 or key.endswith("." + SCALED_FP8) or key.endswith(MARKER_SUFFIXES)


def scale_target(key: str) -> str | None:
    """'<layer>.scale_weight' / '<layer>.weight_scale' -> '<layer>.weight'; None for other keys."""
    for suffix in SCALE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".weight"
    return None


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scalar scale) with `fp8.float() * scale ~= weight`: the
    per-tensor absmax scale of ComfyUI's scaled-fp8 files and of our Fp8Linear."""
    w = weight.float()
    scale = (w.abs().max() / FP8_MAX).clamp_min(1e-12)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale.reshape(())


def header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (safetensors dtype name, shape)} from the file's header only (no tensor is read).
    Raises safetensors' SafetensorError or OSError for a truncated or unreadable file."""
    with safe_open(str(path), framework="pt") as f:
        out = {}
        for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
            part = f.get_slice(key)
            out[key] = (part.get_dtype(), tuple(part.get_shape()))
        return out


def read_state(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               prefixes: Iterable[str] = ()) -> dict[str, torch.Tensor]:  # fmt: skip
    """Every weight of a ComfyUI file, prefixes stripped, markers dropped, scaled-fp8 weights
    dequantized (`weight.float() * scale`, computed on `device`), floats cast to `dtype` (None:
    as stored). Non-float tensors (the embedded tokenizer) are returned as they are."""
    device = torch.device(device)
    load_device = str(device) if device.type in ("cpu", "cuda") else "cpu"
    prefixes = tuple(prefixes)
    with safe_open(str(path), framework="pt", device=load_device) as f:
        keys = list(f.keys())
        scales = {scale_target(k): k for k in keys if scale_target(k)}
        state = {}
        for key in keys:
            if is_marker(key) or scale_target(key):
                continue
            tensor = f.get_tensor(key).to(device)
            if tensor.dtype in FP8_DTYPES:
                scale = f.get_tensor(scales[key]).to(device).float() if key in scales else 1.0
                tensor = tensor.float() * scale
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[strip_prefix(key, prefixes)] = tensor
    return state


@dataclass(frozen=True)
class Identity:
    """What a .safetensors file holds, from its header."""

    component: str | None  # "dit", "text_encoder", "vae", "audio_encoder"; None: none of ours
    fits: bool  # the component Wan2.2-S2V needs (not another model's of the same kind)
    what: str  # a description for messages, e.g. "a Wan T2V DiT (no audio injection)"
    fp8: bool = False  # stores fp8 weights
    tokenizer: bool = False  # embeds the sentencepiece model (umT5)


def identify(path: str | Path) -> Identity:
    """Recognise a ComfyUI (or other) single file by its keys and shapes; reads the header only."""
    head = header(path)
    fp8 = any(dtype in FP8_HEADER_DTYPES for dtype, _ in head.values())
    dit = {strip_prefix(k, DIT_PREFIXES): v for k, v in head.items()}
    if "patch_embedding.weight" in dit and "blocks.0.self_attn.q.weight" in dit:
        return _identify_dit(dit, fp8)
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in head:
        if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in head:
            return Identity("text_encoder", False, "a T5 encoder with one position bias (T5-XXL of Flux/SD3?), "
                            "not umT5-XXL", fp8)  # fmt: skip
        vocab = head.get("shared.weight", ("", (0, 0)))[1][0]
        return Identity("text_encoder", True, f"a umT5 encoder ({vocab} tokens)", fp8, SPIECE_MODEL in head)
    if "encoder.conv1.weight" in head and "conv2.weight" in head:
        z_dim = head["conv2.weight"][1][0]
        if z_dim != 16:
            return Identity("vae", False, f"a {z_dim}-channel VAE (the Wan2.2 VAE of the TI2V 5B?), not the "
                            "16-channel Wan2.1 VAE that Wan2.2-S2V uses", fp8)  # fmt: skip
        return Identity("vae", True, "the Wan2.1 VAE", fp8)
    w2v = {strip_prefix(k, (WAV2VEC_PREFIX,)) for k in head}
    if "feature_extractor.conv_layers.0.conv.weight" in w2v and "encoder.layer_norm.bias" in w2v:
        width = head.get(f"{WAV2VEC_PREFIX}encoder.layer_norm.bias", head.get("encoder.layer_norm.bias"))[1][0]
        return Identity("audio_encoder", True, f"a wav2vec2 encoder (width {width})", fp8)
    if "model.encoder.embed_positions.weight" in head or "encoder.embed_positions.weight" in head:
        return Identity("audio_encoder", False, "a Whisper audio encoder, not wav2vec2", fp8)
    sample = ", ".join(sorted(head)[:3])
    return Identity(None, False, f"not a Wan2.2-S2V component (keys such as {sample})", fp8)


def _identify_dit(keys: dict[str, tuple[str, tuple[int, ...]]], fp8: bool) -> Identity:
    dim, in_dim = keys["patch_embedding.weight"][1][:2]
    blocks = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
    size = f"width {dim}, {blocks} blocks"
    if all(k in keys for k in S2V_DIT_KEYS):
        return Identity("dit", True, f"a Wan2.2-S2V DiT ({size})", fp8)
    if any(k.startswith("vace_") for k in keys):
        kind = "VACE"
    elif any(k.startswith("img_emb.") for k in keys) or in_dim == 36:
        kind = "I2V"
    elif in_dim == 48:
        kind = "TI2V"
    else:
        kind = "T2V"
    lacks = ", ".join(k.split(".")[0] + ".*" for k in S2V_DIT_KEYS if k not in keys)
    return Identity("dit", False, f"a Wan {kind} DiT ({size}; no {lacks}), not Wan2.2-S2V", fp8)
