"""Speech -> per-frame audio conditioning, through transformers' Wav2Vec2.

Follows the reference (`wan/modules/s2v/audio_encoder.py` and `WanS2V.encode_audio`):

1. the 16 kHz waveform is normalised by the folder's feature extractor (zero mean, unit variance)
   and run through wav2vec2 with every hidden state kept (embeddings + each layer: 25 for
   wav2vec2-large), giving [layers, T50, dim] at 50 Hz;
2. the features are linearly interpolated (align_corners) to 30 Hz: T30 = int(T50 / 50 * 30);
3. video frame i (16 fps) takes feature index round(i / 16 * 30) (numpy's half-to-even rounding,
   as the reference), or zeros once that index is past the audio (the reference's padding with
   m = 0, i.e. one feature per frame);
4. the result is laid out [1, layers, dim, frames], the shape the DiT's audio path takes; clip r
   reads frames r*infer_frames .. (r+1)*infer_frames.

The encoder comes from the official Wav2Vec2ForCTC folder, or from ComfyUI's single file
(`wav2vec2_large_english_fp16.safetensors`: transformers' names, fp16; model/comfy.py), whose
configuration is read from an official folder's config.json when one is given, else inferred
from its shapes (`wav2vec2_config`), and whose preprocessing is the standard one (zero mean, unit
variance at 16 kHz, as the released preprocessor_config.json and ComfyUI's encoder do).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Model

from model import comfy
from model.layout import CheckpointError
from model.timing import LoadTimings, phase

SAMPLE_RATE = 16_000
FEATURE_RATE = 50  # wav2vec2 frames per second (20 ms stride)
VIDEO_RATE = 30  # the reference resamples features to 30 per second before bucketing
FPS = 16
HEAD_WIDTH = 64  # every released wav2vec2 has 64-wide attention heads (large: 16 of them)
CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)  # the feature encoder of every wav2vec2: 320 samples per feature
_POS_CONV = "encoder.pos_conv_embed.conv."
# torch's weight-norm parametrization names, and the older weight_g / weight_v
_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


def interpolate_features(features: torch.Tensor, input_rate: int = FEATURE_RATE, output_rate: int = VIDEO_RATE):
    """[layers, T_in, dim] -> [layers, int(T_in / input_rate * output_rate), dim], linear, align_corners."""
    length = int(features.shape[1] / float(input_rate) * output_rate)
    out = F.interpolate(features.transpose(1, 2), size=length, mode="linear", align_corners=True)
    return out.transpose(1, 2)


def frame_indices(num_frames: int, fps: int = FPS, video_rate: int = VIDEO_RATE) -> np.ndarray:
    """Feature index per video frame: the reference's sample times i/fps at `video_rate`, rounded."""
    return np.round(np.arange(num_frames) / fps * video_rate).astype(np.int64)


def bucket_per_frame(features: torch.Tensor, num_frames: int, fps: int = FPS) -> torch.Tensor:
    """[layers, T30, dim] -> [1, layers, dim, num_frames]; frames past the audio get zeros."""
    layers, length, dim = features.shape
    idx = torch.from_numpy(frame_indices(num_frames, fps))
    inside = idx < length
    out = features.new_zeros(layers, num_frames, dim)
    out[:, inside] = features[:, idx[inside].to(features.device)]
    return out.permute(0, 2, 1).unsqueeze(0).contiguous()


def wav2vec2_config(shapes: dict[str, tuple[int, ...]]) -> Wav2Vec2Config:
    """The Wav2Vec2Config implied by a state dict's shapes (transformers' names, no prefix), as
    ComfyUI infers it: the layer-norm feature encoder goes with the stable layer norm (large models),
    heads are 64 wide (narrower test models: one head)."""
    hidden = shapes["encoder.layer_norm.weight"][0]
    convs = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"feature_extractor\.conv_layers\.(\d+)\.", k))})
    pos = shapes.get(_POS_CONV + "weight_v", shapes.get(_POS_CONV + _WEIGHT_NORM["weight_v"]))
    layer_norm = "feature_extractor.conv_layers.1.layer_norm.weight" in shapes
    return Wav2Vec2Config(
        hidden_size=hidden,
        num_hidden_layers=len({m.group(1) for k in shapes if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}),
        num_attention_heads=max(1, hidden // HEAD_WIDTH),
        intermediate_size=shapes["encoder.layers.0.feed_forward.intermediate_dense.weight"][0],
        conv_dim=tuple(shapes[f"feature_extractor.conv_layers.{i}.conv.weight"][0] for i in convs),
        conv_kernel=tuple(shapes[f"feature_extractor.conv_layers.{i}.conv.weight"][2] for i in convs),
        conv_stride=CONV_STRIDES[: len(convs)],
        conv_bias="feature_extractor.conv_layers.1.conv.bias" in shapes,
        feat_extract_norm="layer" if layer_norm else "group",
        do_stable_layer_norm=layer_norm,
        num_conv_pos_embeddings=pos[2],
        num_conv_pos_embedding_groups=hidden // pos[1],
        vocab_size=shapes.get("lm_head.weight", (32,))[0],
    )


def standard_feature_extractor() -> Wav2Vec2FeatureExtractor:
    """wav2vec2-large-xlsr-53-english's preprocessing (its preprocessor_config.json)."""
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                    do_normalize=True, return_attention_mask=True)  # fmt: skip


class AudioEncoder:
    """wav2vec2 (a Hugging Face Wav2Vec2ForCTC folder) -> all hidden states -> frame buckets."""

    def __init__(self, model: Wav2Vec2Model, feature_extractor: Wav2Vec2FeatureExtractor):
        self.model = model.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        timings: LoadTimings | None = None,
    ) -> AudioEncoder:
        """Load the official wav2vec2 folder, or ComfyUI's single file (its config.json and
        preprocessor_config.json from `config_dir` where given, else inferred / standard)."""
        path = Path(path)
        if path.is_dir():
            return cls.from_folder(path, device, dtype, timings)
        config_dir = Path(config_dir) if config_dir else None
        with phase(timings, "read", device):
            try:
                state = comfy.read_state(path, device, dtype, prefixes=(comfy.WAV2VEC_PREFIX,))
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read the wav2vec2 file ({exc}); download it again") from exc
        with phase(timings, "build", device):
            try:
                shapes = {k: tuple(v.shape) for k, v in state.items()}
                config = (
                    Wav2Vec2Config.from_pretrained(str(config_dir), local_files_only=True)
                    if config_dir and (config_dir / "config.json").is_file()
                    else wav2vec2_config(shapes)
                )
                extractor = (
                    Wav2Vec2FeatureExtractor.from_pretrained(str(config_dir), local_files_only=True)
                    if config_dir and (config_dir / "preprocessor_config.json").is_file()
                    else standard_feature_extractor()
                )
            except (KeyError, TypeError, OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: not a wav2vec2 encoder ({exc!r} missing or unreadable)") from exc
            with torch.device("meta"):
                model = Wav2Vec2Model(config)
            expected = model.state_dict()
            state = {_hf_key(k, expected): v for k, v in state.items() if not k.startswith("lm_head.")}
            if "masked_spec_embed" in expected and "masked_spec_embed" not in state:  # training-only
                state["masked_spec_embed"] = torch.zeros(config.hidden_size, dtype=dtype, device=device)
            try:
                model.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as exc:
                raise CheckpointError(f"{path}: does not match a wav2vec2 encoder: {exc}") from exc
        if extractor.sampling_rate != SAMPLE_RATE:
            raise CheckpointError(f"{config_dir}: feature extractor expects {extractor.sampling_rate} Hz, not 16 kHz")
        return cls(model.to(device), extractor)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        timings: LoadTimings | None = None,
    ) -> AudioEncoder:
        """Load the checkpoint's wav2vec2 folder (config.json, weights, preprocessor_config.json)."""
        folder = Path(folder)
        with phase(timings, "read"):
            try:
                extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)
                # The folder is a CTC model; only its encoder is needed (the reference discards the logits).
                model = Wav2Vec2ForCTC.from_pretrained(str(folder), local_files_only=True, dtype=dtype).wav2vec2
            except Exception as exc:
                raise CheckpointError(f"{folder}: cannot load the wav2vec2 audio encoder ({exc})") from exc
        if extractor.sampling_rate != SAMPLE_RATE:
            raise CheckpointError(f"{folder}: feature extractor expects {extractor.sampling_rate} Hz, not 16 kHz")
        with phase(timings, "to_device", device):
            return cls(model.to(device), extractor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        """Hidden states returned per step (transformer layers + the embedding output)."""
        return self.model.config.num_hidden_layers + 1

    def to(self, device: torch.device | str) -> AudioEncoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def features(self, waveform: np.ndarray, sample_rate: int) -> torch.Tensor:
        """All wav2vec2 hidden states at 30 Hz, float32 [layers, T30, dim]."""
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"audio must be {SAMPLE_RATE} Hz for wav2vec2, got {sample_rate} Hz")
        wave = np.asarray(waveform)
        if wave.ndim != 1:
            raise ValueError(f"audio must be a mono 1-D waveform, got shape {wave.shape}")
        if not np.issubdtype(wave.dtype, np.floating):
            raise ValueError(f"audio must be float samples in [-1, 1], got dtype {wave.dtype}")
        if wave.size < SAMPLE_RATE // FEATURE_RATE * 2:
            raise ValueError(f"audio too short for wav2vec2: {wave.size} samples")
        values = self.feature_extractor(
            wave.astype(np.float32), sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_values
        param = next(self.model.parameters())
        out = self.model(values.to(param.device, param.dtype), output_hidden_states=True)
        feats = torch.cat(out.hidden_states).float()  # [layers, T50, dim]
        return interpolate_features(feats)

    def conditioning(self, waveform: np.ndarray, sample_rate: int, num_frames: int, fps: int = FPS) -> torch.Tensor:
        """Audio conditioning for `num_frames` video frames: float32 [1, layers, dim, num_frames]."""
        if num_frames <= 0:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        return bucket_per_frame(self.features(waveform, sample_rate), num_frames, fps)


def _hf_key(key: str, expected: dict) -> str:
    """A positional-convolution weight-norm key in the naming `expected` uses (either form is in use)."""
    if key.startswith(_POS_CONV):
        leaf = key[len(_POS_CONV) :]
        for old, new in _WEIGHT_NORM.items():
            if leaf == old and key not in expected:
                return _POS_CONV + new
            if leaf == new and key not in expected:
                return _POS_CONV + old
    return key
