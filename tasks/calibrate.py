"""Calibration on the user's own weights: what each speed preset saves and what it changes.

`calibrate(checkpoint, out)` renders one short reference segment (a portrait and speech; the
examples under manifests/examples/media by default) exactly, then with each preset, on the GPU the
batch will use, and writes a JSON document:

- per preset: seconds per clip and the speed-up against exact, the DiT passes per clip actually run
  (what the planner then charges for the preset), and the drift from the exact frames: PSNR and SSIM
  over all frames, and the same over the mouth, found by the face detector the normalize stage uses
  (the lower middle of the face box, where lip sync shows);
- with LiveAvatar's LoRA (`distilled_lora`), distilled mode too: seconds per frame against exact and
  the drift of its frames from exact's (a different model: the drift says how far from the teacher
  it lands, not whether it is worse);
- MagCache's magnitude ratios (mean over tokens of |v_t| / |v_{t-1}| along the exact run, averaged
  over its clips), which the `magcache` cache setting reads; a preset variant with MagCache is
  measured too.

Speed and drift are only meaningful on the real weights: random weights (the tiny test checkpoint,
the benchmarks) measure the mechanics, nothing about quality. The document says so in `note`.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from model.presets import PRESET_NAMES, SpeedConfig, preset
from tasks import storage
from tasks.normalize.audio import decode_audio
from tasks.normalize.image import largest_face, size_bucket
from tasks.records import FPS, INFER_FRAMES, MODEL_SAMPLE_RATE, Resolution

log = logging.getLogger(__name__)

EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "media"
DEFAULT_IMAGE = EXAMPLES / "astronaut.jpg"
DEFAULT_AUDIO = EXAMPLES / "welcome.wav"
DEFAULT_PROMPT = "A friendly presenter speaking to the camera in a bright studio"
DEFAULT_OUT = Path("s2v-calibration.json")
VERSION = 1
NOTE = (
    "Speed-ups are measured on this machine with these weights. PSNR/SSIM are the drift of each preset's "
    "frames from the exact frames of the same seed: they say how much a preset changes the output, not "
    "whether the change is visible or harmful; judge a few clips by eye too. On random weights (test "
    "checkpoints, benchmarks) these figures measure nothing about quality."
)
MAGCACHE_VARIANT = "balanced+magcache"


def mouth_box(image: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the mouth region of the largest face in an RGB image: the middle half of
    the face box's width over 62-92 % of its height (a frontal Haar box runs brow to chin); None
    without a face."""
    face = largest_face(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY))
    if face is None:
        return None
    x, y, w, h = face
    return x + w // 4, y + round(0.62 * h), x + w - w // 4, min(image.shape[0], y + round(0.92 * h))


def drift(exact: np.ndarray, other: np.ndarray, box: tuple[int, int, int, int] | None = None) -> dict:
    """Mean PSNR (dB) and SSIM over frames of uint8 [T, H, W, 3] videos, whole frame and inside `box`."""
    out = {"psnr": _mean_psnr(exact, other), "ssim": _mean_ssim(exact, other)}
    if box is not None:
        x0, y0, x1, y1 = box
        a, b = exact[:, y0:y1, x0:x1], other[:, y0:y1, x0:x1]
        small = min(a.shape[1:3]) < 7  # SSIM's 7x7 window needs at least that much
        out |= {"mouth_psnr": _mean_psnr(a, b), "mouth_ssim": None if small else _mean_ssim(a, b)}
    else:
        out |= {"mouth_psnr": None, "mouth_ssim": None}
    return out


def _mean_psnr(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio  # scikit-image: the model extra (only calibrate needs it)

    values = [
        float("inf") if np.array_equal(x, y) else peak_signal_noise_ratio(x, y, data_range=255)
        for x, y in zip(a, b, strict=True)
    ]
    return round(float(np.mean(values)), 3)


def _mean_ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    values = [structural_similarity(x, y, channel_axis=2, data_range=255) for x, y in zip(a, b, strict=True)]
    return round(float(np.mean(values)), 5)


def reference_inputs(
    image: str | Path | None, audio: str | Path | None, seconds: float, size: tuple[int, int] | None, resolution: str
) -> tuple[np.ndarray, np.ndarray]:
    """The portrait cropped to the output size (`size` = (height, width), default the resolution
    bucket of its aspect) and `seconds` of 16 kHz speech (zero-padded when the file is shorter)."""
    from model.pipeline import prepare_reference

    with Image.open(image or DEFAULT_IMAGE) as img:
        picture = img.convert("RGB")
    if size is None:
        width, height = size_bucket(picture.width, picture.height, Resolution(resolution))
    else:
        height, width = size
    samples = decode_audio(Path(audio or DEFAULT_AUDIO), MODEL_SAMPLE_RATE)
    want = round(seconds * MODEL_SAMPLE_RATE)
    samples = np.pad(samples[:want], (0, max(0, want - len(samples))))
    return prepare_reference(picture, height, width), samples.astype(np.float32)


def _variants(names: Iterable[str], calibration: dict) -> dict[str, SpeedConfig]:
    out = {}
    for name in names:
        if name == MAGCACHE_VARIANT:
            out[name] = preset("balanced", calibration, cache="magcache")
        elif name != "exact":
            out[name] = preset(name, calibration)
    return out


def calibrate(
    checkpoint: str | Path | None = None,
    out: str | Path = DEFAULT_OUT,
    *,
    pipeline=None,
    image: str | Path | None = None,
    audio: str | Path | None = None,
    prompt: str = DEFAULT_PROMPT,
    presets: Iterable[str] = (*[p for p in PRESET_NAMES if p != "exact"], MAGCACHE_VARIANT),
    num_clips: int = 2,
    infer_frames: int = INFER_FRAMES,
    steps: int = 40,
    seed: int = 42,
    resolution: str = "480p",
    size: tuple[int, int] | None = None,
    device: str | None = None,
    offload: bool | str = False,
    warmup: bool = True,
    progress: Callable[[str], None] | None = None,
    distilled_lora: str | Path | None = None,
) -> dict:
    """Render the reference segment exactly and with each preset; write and return the document.

    `pipeline`: an S2VPipeline already loaded (else one is loaded from `checkpoint`). `warmup`: a
    2-step run first, so torch.compile's compilation is not charged to the exact run.
    `distilled_lora`: LiveAvatar's LoRA; distilled mode is then rendered too (as many 48-frame clips
    as cover the segment) and measured per frame against exact (`distilled` in the document)."""
    say = progress or log.info
    if pipeline is None:
        from model.pipeline import S2VPipeline

        say(f"loading {checkpoint}")
        pipeline = S2VPipeline.from_checkpoint(checkpoint, device=device, offload=offload)
    shift = {"480p": 3.0, "720p": 5.0}[resolution]
    picture, speech = reference_inputs(image, audio, num_clips * infer_frames / FPS, size, resolution)
    args = {"num_clips": num_clips, "infer_frames": infer_frames, "seed": seed, "shift": shift, "steps": steps}

    def render(speed: SpeedConfig | None, record: bool = False) -> tuple[np.ndarray, list]:
        clips = list(pipeline.generate_clips(picture, speech, prompt, speed=speed, record_steps=record, **args))
        return np.concatenate([c.frames for c in clips]), clips

    if warmup:  # compiles the guided (batch of 2) and conditional (batch of 1) graphs, first and later clip
        say("warm-up (compilation)")
        list(pipeline.generate_clips(picture, speech, prompt, speed=SpeedConfig(steps=2, cfg_steps=1), **args))
    say(f"exact: {num_clips} clips of {infer_frames} frames, {steps} steps")
    exact_frames, exact_clips = render(None, record=True)
    exact_s = _per_clip(c.seconds for c in exact_clips)
    ratios = np.mean([c.steps.ratios for c in exact_clips], axis=0)
    doc: dict = {
        "version": VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "device": str(pipeline.device),
        "gpu": _gpu_name(pipeline.device),
        "model_width": pipeline.config.dim,
        "note": NOTE,
        "reference": {
            "image": str(image or DEFAULT_IMAGE),
            "audio": str(audio or DEFAULT_AUDIO),
            "prompt": prompt,
            "clips": num_clips,
            "infer_frames": infer_frames,
            "size": list(picture.shape[:2]),
            "steps": steps,
            "seed": seed,
        },
        "exact": {"seconds_per_clip": exact_s, "forwards_per_clip": _per_clip(c.forwards for c in exact_clips)},
        "magcache": {"steps": steps, "ratios": [round(float(r), 6) for r in ratios]},
        "presets": {},
    }
    if pipeline.config.dim < 5120:
        doc["warning"] = "not the 14B model (a test checkpoint?): the figures below measure the mechanics only"
    box = mouth_box(picture)
    doc["mouth_box"] = list(box) if box else None
    if box is None:
        say("no face found in the reference image: mouth drift not measured")
    for name, config in _variants(presets, doc).items():
        say(f"{name}: {config}")
        frames, clips = render(config)
        seconds = _per_clip(c.seconds for c in clips)
        doc["presets"][name] = {
            "speed": config.to_dict(),
            "seconds_per_clip": seconds,
            "speedup": round(exact_s / seconds, 3) if seconds > 0 else None,
            "forwards_per_clip": _per_clip(c.forwards for c in clips),
            **drift(exact_frames, frames, box),
        }
    if distilled_lora:
        say("distilled: LiveAvatar's 4 steps, clips of 48 frames")
        doc["distilled"] = _distilled(pipeline, distilled_lora, picture, speech, prompt, seed, exact_frames, box)
        doc["distilled"]["speedup"] = round(_per_frame(exact_clips) / doc["distilled"]["seconds_per_frame"], 3)
    storage.write_text(str(out), json.dumps(doc, indent=1, allow_nan=True) + "\n")
    return doc


def _distilled(pipeline, lora, picture, speech, prompt, seed, exact_frames, box) -> dict:
    """Distilled mode on the same reference (over the pipeline's components), its drift from exact
    over the frames both cover; the DiT's base weights are given back after."""
    from model.distilled import DistilledPipeline
    from model.presets import DISTILLED_INFER_FRAMES

    distilled = DistilledPipeline(
        pipeline.transformer, pipeline.text_encoder, pipeline.audio_encoder, pipeline.vae,
        device=pipeline.device, offload=pipeline.offload,
    )  # fmt: skip
    num_clips = -(-len(exact_frames) // DISTILLED_INFER_FRAMES)
    want = round((num_clips * DISTILLED_INFER_FRAMES / FPS) * MODEL_SAMPLE_RATE)
    speech = np.pad(speech, (0, max(0, want - len(speech))))
    distilled.use_liveavatar(lora)
    try:
        clips = list(distilled.generate_clips(picture, speech, prompt, num_clips=num_clips, seed=seed))
    finally:
        pipeline.set_loras([])
    frames = np.concatenate([c.frames for c in clips])
    both = min(len(frames), len(exact_frames))
    return {
        "seconds_per_frame": _per_frame(clips),
        "infer_frames": DISTILLED_INFER_FRAMES,
        "forwards_per_clip": _per_clip(c.forwards for c in clips),
        **drift(exact_frames[:both], frames[:both], box),
    }


def _per_frame(clips) -> float:
    return round(sum(c.seconds for c in clips) / max(1, sum(len(c.frames) for c in clips)), 6)


def _per_clip(values: Iterable[float]) -> float:
    values = list(values)
    return round(float(sum(values)) / len(values), 4) if values else 0.0


def _gpu_name(device) -> str | None:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def read_calibration(path: str | Path | None) -> dict | None:
    """The calibration document at `path` (None for no path); ValueError naming the file when it
    is not one."""
    if not path:
        return None
    try:
        doc = json.loads(storage.read_text(str(path)))
    except FileNotFoundError:
        raise ValueError(f"calibration file {path} does not exist (run `s2v-batch calibrate` first)") from None
    except ValueError as exc:
        raise ValueError(f"calibration file {path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or "presets" not in doc:
        raise ValueError(f"calibration file {path} is not an s2v-batch calibration (version {VERSION})")
    return doc


def report_lines(doc: dict) -> list[str]:
    """A few lines for the terminal: per preset the speed-up, passes and drift."""
    lines = [
        f"exact: {doc['exact']['seconds_per_clip']:.1f} s per clip, {doc['exact']['forwards_per_clip']:.0f} DiT passes"
    ]
    for name, r in doc["presets"].items():
        mouth = f", mouth PSNR {r['mouth_psnr']:.1f} dB" if r.get("mouth_psnr") is not None else ""
        lines.append(
            f"{name}: {r['speedup']}x faster ({r['seconds_per_clip']:.1f} s per clip, {r['forwards_per_clip']:.0f} "
            f"DiT passes), PSNR {r['psnr']:.1f} dB, SSIM {r['ssim']:.3f}{mouth}"
        )
    if d := doc.get("distilled"):
        mouth = f", mouth PSNR {d['mouth_psnr']:.1f} dB" if d.get("mouth_psnr") is not None else ""
        lines.append(
            f"distilled: {d['speedup']}x faster per frame ({d['forwards_per_clip']:.0f} block passes per "
            f"{d['infer_frames']}-frame clip), PSNR {d['psnr']:.1f} dB, SSIM {d['ssim']:.3f} from exact{mouth}"
        )
    if doc.get("warning"):
        lines.append(doc["warning"])
    lines.append(doc["note"])
    return lines
