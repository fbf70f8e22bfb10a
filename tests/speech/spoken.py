"""Speech the speech tests make with espeak-ng (Debian package), and a row's inputs to speech_step."""

from __future__ import annotations

import functools
import io
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image
from scipy.signal import resample_poly

from tasks.records import AudioQC, ImageQC, ManifestRow, NormalizedAssets

SR = 16_000


def espeak(text: str, voice: str = "en-us", speed: int | None = None) -> np.ndarray:
    """``text`` said by espeak-ng at ``speed`` words a minute (espeak's default when None), at 16 kHz."""
    rate = ["-s", str(speed)] if speed else []
    wav = subprocess.run(["espeak-ng", "-v", voice, *rate, "--stdout", text], capture_output=True, check=True).stdout
    x, source_rate = sf.read(io.BytesIO(wav), dtype="float32")
    return resample_poly(x, SR, source_rate).astype(np.float32)


@functools.cache
def say(word: str, voice: str = "en-us", speed: int | None = None) -> np.ndarray:
    """``word`` said alone, trimmed to where it is audible."""
    x = espeak(word, voice, speed)
    idx = np.flatnonzero(np.abs(x) > 2e-3)
    return x[idx[0] : idx[-1] + 1]


def phrases(
    said: list[str], seed: int = 0, voice: str = "en-us", speed: int | None = None, tail_s: float = 0.0
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Each phrase said alone, joined with 50-300 ms pauses over a light noise floor, after 0.3 s and
    before ``tail_s`` of silence; returns the audio and the (start, end) of each phrase in seconds."""
    rng = np.random.default_rng(seed)
    parts, truth, pos = [np.zeros(int(0.3 * SR), np.float32)], [], int(0.3 * SR)
    for p in said:
        a = say(p, voice, speed)
        truth.append((pos / SR, (pos + len(a)) / SR))
        gap = int(rng.uniform(0.05, 0.3) * SR)
        parts += [a, np.zeros(gap, np.float32)]
        pos += len(a) + gap
    parts.append(np.zeros(int(tail_s * SR), np.float32))
    audio = np.concatenate(parts)
    return audio + rng.normal(0, 3e-4, len(audio)).astype(np.float32), truth


def row_inputs(
    tmp_path: Path, audio: np.ndarray, script: str | None, language: str | None = "en"
) -> tuple[ManifestRow, NormalizedAssets]:
    """A manifest row and its normalized assets in ``tmp_path``, as speech_step takes them."""
    wav, png = tmp_path / "audio_16k.wav", tmp_path / "image.png"
    sf.write(wav, audio, SR, subtype="PCM_16")
    Image.new("RGB", (64, 64), (120, 110, 100)).save(png)
    duration = len(audio) / SR
    qc = AudioQC(
        duration_s=duration, source_duration_s=duration, source_sample_rate=SR, source_channels=1,
        source_codec="pcm_s16le", integrated_lufs=-20.0, peak_dbfs=-3.0, clipping_ratio=0.0,
        trimmed_start_s=0.0, trimmed_end_s=0.0,
    )  # fmt: skip
    image_qc = ImageQC(source_width=64, source_height=64, face_found=False, sharpness=0.0, crop_box=(0, 0, 64, 64))
    row = ManifestRow(row=1, id="r1", audio=str(wav), image=str(png), script=script, language=language, output="r1.mp4")
    assets = NormalizedAssets(
        row_id="r1", audio_16k=str(wav), audio_master=str(wav), image=str(png), width=64, height=64,
        duration_s=duration, num_samples=len(audio), script=script, audio_qc=qc, image_qc=image_qc,
    )  # fmt: skip
    return row, assets
