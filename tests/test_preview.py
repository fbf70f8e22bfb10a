"""The preview animatic: size, clip layout, visible label/caption/boundary markers, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tasks.generate.base import Generator
from tasks.generate.preview import FLASH_FRAMES, PreviewGenerator
from tasks.records import Cue, Segment, SegmentJob

W, H = 96, 160
GREY = 128
INFER = 16


def _job(tmp_path: Path, *, frames: int = 40, cues: list[Cue] | None = None) -> SegmentJob:
    image = tmp_path / "ref.png"
    # Flat grey, so the zoom cannot change it and every deviation is an overlay.
    Image.fromarray(np.full((H, W, 3), GREY, np.uint8)).save(image)
    audio = tmp_path / "seg.wav"
    sr = 16_000
    n = frames * sr // 16
    t = np.arange(n) / sr
    # A tone in the first second only, so the level meter has something to show.
    sf.write(audio, (0.5 * np.sin(2 * np.pi * 200 * t) * (t < 1.0)).astype(np.float32), sr, subtype="PCM_16")
    clips = -(-frames // INFER)
    seg = Segment(index=0, start_sample=0, end_sample=n, start_s=0.0, end_s=n / sr, frames=frames, clips=clips, seed=7)
    return SegmentJob(
        row_id="row-a", segment=seg, image=str(image), audio=str(audio), prompt="", width=W, height=H,
        infer_frames=INFER, cues=cues or [],
    )  # fmt: skip


def _all_frames(gen: PreviewGenerator, job: SegmentJob) -> np.ndarray:
    return np.concatenate([c.frames for c in gen.clips(job)])


def test_clip_layout_and_protocol(tmp_path: Path) -> None:
    gen = PreviewGenerator()
    assert isinstance(gen, Generator) and gen.name == "preview"
    job = _job(tmp_path, frames=40)
    clips = list(gen.clips(job))
    assert [c.index for c in clips] == [0, 1, 2]
    for c in clips:
        # Whole clips, as the model yields them; the stage trims the last to the plan.
        assert c.frames.shape == (INFER, H, W, 3) and c.frames.dtype == np.uint8
        assert int(c.state["next_frame"][0]) == (c.index + 1) * INFER
        assert c.gpu_s == 0.0


def test_label_caption_and_boundary_markers_are_visible(tmp_path: Path) -> None:
    cue = Cue(start=1.0, end=1.9, text="Hello there,\nfriend.")
    frames = _all_frames(PreviewGenerator(), _job(tmp_path, frames=48, cues=[cue])).astype(int)
    differs = np.abs(frames - GREY).sum(axis=-1) > 30  # (T, H, W) pixels that are not the plain image

    # The PREVIEW label sits at the top left of every frame, inside the flash bar.
    label = differs[:, 6:18, 6:40]
    assert label.mean(axis=(1, 2)).min() > 0.8
    # The middle of the frame, where a portrait's face is, stays the reference image itself.
    assert differs[:, H // 4 : 2 * H // 3, W // 8 : 7 * W // 8].mean() < 0.01

    # Caption region: drawn at t in [1.0, 1.9) s = frames 16..30, absent at frame 40 (2.5 s).
    band = slice(int(H * 0.7), int(H * 0.9))
    with_caption = differs[20, band].mean()
    without = differs[40, band].mean()
    assert with_caption > without + 0.1

    # Clip boundaries (frames 0, 16, 32): the flash bar lights the top rows for FLASH_FRAMES frames.
    top = differs[:, 0, :].mean(axis=1)
    for t in range(48):
        assert (top[t] > 0.9) == (t % INFER < FLASH_FRAMES), t
    # A boundary frame differs visibly from the frame before it.
    assert np.abs(frames[16] - frames[15]).mean() > 5 * np.abs(frames[15] - frames[14]).mean() + 1


def test_deterministic_and_resumable(tmp_path: Path) -> None:
    job = _job(tmp_path, frames=40)
    gen = PreviewGenerator()
    first = list(gen.clips(job))
    again = list(PreviewGenerator().clips(job))
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.frames, b.frames)
    resumed = list(gen.clips(job, start_clip=2, state=first[1].state))
    assert [c.index for c in resumed] == [2]
    assert np.array_equal(resumed[0].frames, first[2].frames)
    with pytest.raises(ValueError, match="state says frame"):
        next(gen.clips(job, start_clip=2, state=first[0].state))


def test_renders_at_planned_480p_size(tmp_path: Path) -> None:
    # The planned 480p portrait size with a smooth gradient: the size holds and the slow zoom
    # moves the picture between the first and last frame of a clip.
    job = _job(tmp_path, frames=INFER)
    ref = np.zeros((832, 480, 3), np.uint8)
    ref[..., 0] = np.linspace(0, 255, 480, dtype=np.uint8)[None, :]
    ref[..., 1] = np.linspace(0, 255, 832, dtype=np.uint8)[:, None]
    Image.fromarray(ref).save(job.image)
    job = job.model_copy(update={"width": 480, "height": 832})
    (clip,) = list(PreviewGenerator().clips(job))
    assert clip.frames.shape == (INFER, 832, 480, 3)
    assert not np.array_equal(clip.frames[0][300:500], clip.frames[-1][300:500])
