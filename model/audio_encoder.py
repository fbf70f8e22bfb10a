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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Model

from model.layout import CheckpointError

SAMPLE_RATE = 16_000
FEATURE_RATE = 50  # wav2vec2 frames per second (20 ms stride)
VIDEO_RATE = 30  # the reference resamples features to 30 per second before bucketing
FPS = 16


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


class AudioEncoder:
    """wav2vec2 (a Hugging Face Wav2Vec2ForCTC folder) -> all hidden states -> frame buckets."""

    def __init__(self, model: Wav2Vec2Model, feature_extractor: Wav2Vec2FeatureExtractor):
        self.model = model.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor

    @classmethod
    def from_folder(
        cls, folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> AudioEncoder:
        """Load the checkpoint's wav2vec2 folder (config.json, weights, preprocessor_config.json)."""
        folder = Path(folder)
        try:
            extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)
            # The folder is a CTC model; only its encoder is needed (the reference discards the logits).
            model = Wav2Vec2ForCTC.from_pretrained(str(folder), local_files_only=True, dtype=dtype).wav2vec2
        except Exception as exc:
            raise CheckpointError(f"{folder}: cannot load the wav2vec2 audio encoder ({exc})") from exc
        if extractor.sampling_rate != SAMPLE_RATE:
            raise CheckpointError(f"{folder}: feature extractor expects {extractor.sampling_rate} Hz, not 16 kHz")
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
