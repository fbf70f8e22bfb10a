"""The `wan-s2v` backend in distilled mode (LiveAvatar's LoRA and streaming loop) on the tiny
checkpoint, through the segment driver: clips, a resumed segment identical to an uninterrupted
one, one worker serving both modes, settings the mode cannot honour refused before any
generation, and `calibrate` measuring it against exact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from model.config import S2VConfig
from model.lora import LoraError
from model.tiny import write_liveavatar_lora, write_tiny_checkpoint
from tasks.calibrate import calibrate, report_lines
from tasks.generate.stage import clip_path, generate_segment, state_path
from tasks.generate.wan_s2v import WanS2VGenerator
from tasks.records import Segment, SegmentJob

INFER = 24  # 2 blocks of 3 latent frames a clip (the product uses LiveAvatar's 48)
W, H = 64, 64


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distilled")
    return {
        "checkpoint": write_tiny_checkpoint(root / "ckpt", seed=2),
        "lora": write_liveavatar_lora(root / "liveavatar.safetensors", S2VConfig.tiny(), seed=3),
    }


@pytest.fixture(scope="module")
def generator(files: dict[str, Path]) -> WanS2VGenerator:
    return WanS2VGenerator(str(files["checkpoint"]), device="cpu")  # exact by default; jobs name their mode


def _job(root: Path, clips: int, lora: Path) -> SegmentJob:
    y, x = np.mgrid[0:H, 0:W]
    face = np.stack([128 + 100 * np.cos(x / 9), 128 + 100 * np.sin(y / 7), (x * y) % 256], axis=-1)
    Image.fromarray(face.astype(np.uint8)).save(root / "ref.png")
    seconds = clips * INFER / 16
    t = np.arange(int(16_000 * seconds)) / 16_000
    speech = 0.3 * np.sin(2 * np.pi * 150 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 5 * t))
    sf.write(root / "seg.wav", speech.astype(np.float32), 16_000, subtype="PCM_16")
    segment = Segment(
        index=0, start_sample=0, end_sample=len(t), start_s=0.0, end_s=seconds, frames=clips * INFER - 5,
        clips=clips, seed=5,
    )  # fmt: skip
    return SegmentJob(
        row_id="r1", segment=segment, image=str(root / "ref.png"), audio=str(root / "seg.wav"),
        prompt="A person talks to the camera.", width=W, height=H, infer_frames=INFER, steps=4, guidance=1.0,
        mode="distilled", distilled_lora=str(lora),
    )  # fmt: skip


class _LostAfterFirstClip:
    """The generator as a worker sees it when its process dies while rendering clip 1."""

    def __init__(self, inner: WanS2VGenerator):
        self.inner, self.name, self.fingerprint = inner, inner.name, inner.fingerprint

    def clips(self, job: SegmentJob, start_clip: int = 0, state=None):
        for clip in self.inner.clips(job, start_clip, state):
            yield clip
            raise RuntimeError("worker lost")


def test_segment_resumes_to_the_same_clips(generator: WanS2VGenerator, files: dict, tmp_path: Path) -> None:
    job = _job(tmp_path, clips=2, lora=files["lora"])
    whole, part = tmp_path / "whole", tmp_path / "part"
    result = generate_segment(job, generator, whole)
    assert [c.frames for c in result.clips] == [INFER, INFER - 5]
    assert not list(whole.glob("*.state*"))  # a finished segment keeps no state

    with pytest.raises(RuntimeError, match="worker lost"):
        generate_segment(job, _LostAfterFirstClip(generator), part)
    assert state_path(part, 0).exists() and not clip_path(part, 1).exists()
    resumed = generate_segment(job, generator, part)
    assert [c.reused for c in resumed.clips] == [True, False]
    for k in range(2):
        assert clip_path(part, k).read_bytes() == clip_path(whole, k).read_bytes()


def test_one_worker_serves_both_modes_and_exact_stays_exact(
    generator: WanS2VGenerator, files: dict[str, Path], tmp_path: Path
) -> None:
    distilled = _job(tmp_path, clips=1, lora=files["lora"])
    exact = distilled.model_copy(
        update={"mode": None, "distilled_lora": None, "infer_frames": 8, "steps": 2, "guidance": 4.5,
                "segment": distilled.segment.model_copy(update={"frames": 8, "clips": 1})}
    )  # fmt: skip
    before = next(generator.clips(exact)).frames
    out = next(generator.clips(distilled))
    assert out.frames.shape == (INFER, H, W, 3) and out.forwards == 2 * 4  # 2 blocks x 4 steps
    assert np.array_equal(next(generator.clips(exact)).frames, before)  # LiveAvatar's LoRA came off exactly


def test_settings_distilled_cannot_honour(generator: WanS2VGenerator, files: dict[str, Path], tmp_path: Path) -> None:
    job = _job(tmp_path, clips=1, lora=files["lora"])
    for update, message in (
        ({"guidance": 4.5}, "no classifier-free guidance"),
        ({"negative_prompt": "blurry"}, "no classifier-free guidance"),
        ({"infer_frames": 16}, "multiple of 12"),
        ({"distilled_lora": None}, "needs LiveAvatar's LoRA"),
        ({"speed": {"steps": 10}}, "LoRA and sampling alone"),
    ):
        with pytest.raises(ValueError, match=message):
            next(generator.clips(job.model_copy(update=update)))
    with pytest.raises(ValueError, match="needs distilled_lora"):
        WanS2VGenerator(str(files["checkpoint"]), device="cpu", mode="distilled")
    with pytest.raises(ValueError, match="expected one of exact, distilled"):
        WanS2VGenerator(str(files["checkpoint"]), device="cpu", mode="fast")
    wider = dataclasses.replace(S2VConfig.tiny(), dim=128, num_heads=4, ffn_dim=256)
    other = write_liveavatar_lora(tmp_path / "wide.safetensors", wider)
    with pytest.raises(LoraError, match="does not fit the S2V transformer"):
        WanS2VGenerator(str(files["checkpoint"]), device="cpu", mode="distilled", distilled_lora=str(other))
    with pytest.raises(LoraError, match="does not fit the S2V transformer"):
        next(generator.clips(job.model_copy(update={"distilled_lora": str(other)})))


def test_calibrate_measures_distilled_mode_against_exact(files: dict[str, Path], tmp_path: Path) -> None:
    doc = calibrate(
        files["checkpoint"], tmp_path / "cal.json", device="cpu", presets=(), num_clips=1, infer_frames=8,
        size=(H, W), steps=2, warmup=False, distilled_lora=files["lora"],
    )  # fmt: skip
    d = doc["distilled"]
    assert d["infer_frames"] == 48 and d["forwards_per_clip"] == 16 and d["seconds_per_frame"] > 0
    assert d["speedup"] > 0 and np.isfinite(d["psnr"]) and -1 <= d["ssim"] <= 1
    assert any(line.startswith("distilled:") for line in report_lines(doc))
