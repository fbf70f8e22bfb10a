"""Helpers that make real media for tests: synthesized and spoken audio in many formats, and images
with the awkward properties real uploads have (EXIF rotation, CMYK, 16-bit, palette, alpha).

Audio is synthesized with numpy and written with soundfile, spoken with espeak-ng (Debian package),
and re-encoded with the same static ffmpeg the product uses. Images are drawn with PIL; the portrait
is the public-domain astronaut photo scikit-image ships.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from tasks.media import ffmpeg_exe

# ffmpeg arguments per target format; Opus only runs at 8/12/16/24/48 kHz, so it resamples.
ENCODERS: dict[str, list[str]] = {
    "wav": ["-c:a", "pcm_s16le"],
    "mp3": ["-c:a", "libmp3lame", "-b:a", "96k"],
    "m4a": ["-c:a", "aac", "-b:a", "96k"],
    "flac": ["-c:a", "flac"],
    "ogg": ["-c:a", "libopus", "-b:a", "48k"],
}


def _ffmpeg(*args: str) -> str:
    done = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-y", *args], capture_output=True, text=True, check=True
    )
    return done.stderr


def speechlike(
    seconds: float,
    rate: int,
    *,
    channels: int = 1,
    level: float = 0.3,
    seed: int = 0,
) -> np.ndarray:
    """A harmonic tone under a 4 Hz syllable envelope with pauses: speech's rhythm and crest factor."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    envelope *= (np.sin(2 * np.pi * 0.5 * t) > -0.6).astype(float)  # phrase pauses
    mono = level * voice * envelope / np.max(np.abs(voice)) + rng.normal(0, 1e-4, t.size)
    if channels == 1:
        return mono[:, None].astype(np.float32)
    # Slightly different channels, as a real stereo recording has.
    return np.stack([mono * (1.0 - 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)


def with_silence(samples: np.ndarray, rate: int, lead_s: float, tail_s: float) -> np.ndarray:
    """Pad with digital silence before and after."""
    lead = np.zeros((int(round(lead_s * rate)), samples.shape[1]), dtype=samples.dtype)
    tail = np.zeros((int(round(tail_s * rate)), samples.shape[1]), dtype=samples.dtype)
    return np.concatenate([lead, samples, tail])


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    sf.write(str(path), samples, rate, subtype="PCM_16")
    return path


def encode(src: Path, dst: Path, *, rate: int | None = None, channels: int | None = None) -> Path:
    """Re-encode `src` into the format named by `dst`'s suffix (wav, mp3, m4a, flac, ogg)."""
    args = ["-i", str(src)]
    if rate is not None:
        args += ["-ar", str(rate)]
    if channels is not None:
        args += ["-ac", str(channels)]
    _ffmpeg(*args, *ENCODERS[dst.suffix.lstrip(".")], str(dst))
    return dst


def speech(path: Path, text: str, *, rate: int | None = None, channels: int = 1) -> Path:
    """Real synthetic speech from espeak-ng (22050 Hz mono), converted to the format of `path`."""
    raw = path.with_name(path.stem + ".espeak.wav")
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
    return encode(raw, path, rate=rate, channels=channels)


def video_with_sound(audio: Path, path: Path) -> Path:
    """An MP4 (H.264 test pattern + AAC) carrying `audio` as its soundtrack."""
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc=size=64x64:rate=10", "-i", str(audio), "-shortest",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path),
    )  # fmt: skip
    return path


def header_only_wav(path: Path, rate: int = 16_000) -> Path:
    """A valid WAV header that holds no samples at all."""
    sf.write(str(path), np.zeros((0, 1), dtype=np.float32), rate, subtype="PCM_16")
    return path


def loudness(path: Path) -> tuple[float, float]:
    """(integrated LUFS, true peak dBTP) measured by ffmpeg's ebur128 filter, independent of the code."""
    log = _ffmpeg("-nostats", "-i", str(path), "-af", "ebur128=peak=true:framelog=quiet", "-f", "null", "-")
    summary = log[log.rfind("Summary:") :]
    integrated = re.search(r"I:\s+(-?[\d.]+|-inf) LUFS", summary)
    peak = re.search(r"Peak:\s+(-?[\d.]+|-inf) dBFS", summary)
    assert integrated and peak, summary
    return float(integrated.group(1)), float(peak.group(1))


def onset_s(samples: np.ndarray, rate: int, threshold: float = 0.01) -> float:
    """Time of the first sample louder than `threshold` (full scale 1.0)."""
    loud = np.flatnonzero(np.max(np.abs(samples.reshape(samples.shape[0], -1)), axis=1) > threshold)
    assert loud.size, "no sound found"
    return loud[0] / rate


# ---------------------------------------------------------------- images


def astronaut() -> Image.Image:
    """A real portrait photo (NASA, public domain) that OpenCV's face cascade finds a face in."""
    from skimage import data

    return Image.fromarray(data.astronaut())


def quadrants(size: tuple[int, int]) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: shows any rotation."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    arr[: h // 2, w // 2 :] = (0, 255, 0)
    arr[h // 2 :, : w // 2] = (0, 0, 255)
    arr[h // 2 :, w // 2 :] = (255, 255, 255)
    return Image.fromarray(arr)


def exif_rotated_jpeg(path: Path, upright: Image.Image) -> Path:
    """Store `upright` rotated 90° clockwise with EXIF Orientation 6, as phone cameras do.

    A viewer honouring EXIF rotates it back by 90° clockwise; stored pixels are the upright image
    turned 90° counter-clockwise.
    """
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def cmyk_jpeg(path: Path, upright: Image.Image) -> Path:
    upright.convert("CMYK").save(path, format="JPEG", quality=95)
    return path


def gray16_png(path: Path, size: tuple[int, int]) -> Path:
    """A 16-bit greyscale PNG holding a left-to-right ramp over the full 0..65535 range."""
    w, h = size
    ramp = np.tile(np.linspace(0, 65535, w).astype(np.uint16), (h, 1))
    Image.fromarray(ramp).save(path, format="PNG")
    return path


def palette_png(path: Path, upright: Image.Image, transparent_rgb: tuple[int, int, int] | None = None) -> Path:
    """A 16-colour palette PNG; pixels of `transparent_rgb` (if given) marked transparent via tRNS."""
    img = upright.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if transparent_rgb is None:
        img.save(path, format="PNG")
        return path
    palette = img.getpalette() or []
    entries = [tuple(palette[i : i + 3]) for i in range(0, len(palette), 3)]
    img.save(path, format="PNG", transparency=entries.index(transparent_rgb))
    return path


def rgba_png(path: Path, size: tuple[int, int]) -> Path:
    """Fully transparent except an opaque red square in the middle."""
    w, h = size
    arr = np.zeros((h, w, 4), dtype=np.uint8)
    arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (255, 0, 0, 255)
    Image.fromarray(arr).save(path, format="PNG")
    return path


def on_canvas(img: Image.Image, size: tuple[int, int], at: tuple[int, int]) -> Image.Image:
    """Paste `img` onto a grey canvas at `at`, to put a face off-centre."""
    canvas = Image.new("RGB", size, (128, 128, 128))
    canvas.paste(img, at)
    return canvas


def png_bytes(img: Image.Image) -> bytes:
    buf = BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def gradient_image(h: int = 64, w: int = 64) -> np.ndarray:
    """uint8 [h, w, 3] colour ramps: a reference image for the model's tiny checkpoint."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], axis=-1).astype(np.uint8)


def voiced_tone(seconds: float, rate: int = 16_000) -> np.ndarray:
    """float32 mono: a 160 Hz tone with a 4 Hz syllable-like envelope."""
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * 160 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples"


def mixed_manifest(folder: Path) -> Path:
    """A copy of the examples in `folder` (which must not exist) with `mixed.csv`: a good row, a row with
    warnings (a gray square: no face), audio that does not say its script, and a missing file."""
    shutil.copytree(EXAMPLES, folder)
    Image.new("RGB", (640, 640), "gray").save(folder / "media" / "gray.png")
    welcome = "Welcome to the spring product update. Today we will walk through three new features in under a minute."
    thanks = "Thank you for joining this course. See you in the next lesson!"
    manifest = folder / "mixed.csv"
    manifest.write_text(
        "id,audio,image,script\n"
        f'welcome,media/welcome.wav,media/astronaut.jpg,"{welcome}"\n'
        f'noface,media/thanks.flac,media/gray.png,"{thanks}"\n'
        f'wrongfile,media/welcome.wav,media/astronaut.jpg,"{thanks}"\n'
        "missing,media/gone.wav,media/astronaut.jpg,hello\n"
    )
    return manifest
