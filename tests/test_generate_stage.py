"""The per-segment driver: clip and state files, trimming, resume, stale clips, audio cuts."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tasks.generate.base import GeneratedClip
from tasks.generate.preview import PreviewGenerator
from tasks.generate.stage import clip_path, generate_segment, state_path, write_segment_audio
from tasks.records import ClipResult, Segment, SegmentJob

W, H = 64, 112
INFER = 8


class RecordingPreview(PreviewGenerator):
    """The real preview backend, noting how the stage called it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict | None]] = []

    def clips(self, job: SegmentJob, start_clip: int = 0, state: dict | None = None) -> Iterator[GeneratedClip]:
        self.calls.append((start_clip, None if state is None else {k: v.copy() for k, v in state.items()}))
        yield from super().clips(job, start_clip, state)


class UnsavableState(PreviewGenerator):
    """The preview backend with a state value numpy cannot store without pickling."""

    def clips(self, job: SegmentJob, start_clip: int = 0, state: dict | None = None) -> Iterator[GeneratedClip]:
        for clip in super().clips(job, start_clip, state):
            clip.state = {"bad": np.array([object()], dtype=object)}
            yield clip


class StopsAfterFirst(PreviewGenerator):
    """The preview backend, ending early (as a crashed worker would) after one clip."""

    def clips(self, job: SegmentJob, start_clip: int = 0, state: dict | None = None) -> Iterator[GeneratedClip]:
        yield next(super().clips(job, start_clip, state))


def _job(tmp_path: Path, *, frames: int = 20, seed: int = 1) -> SegmentJob:
    image = tmp_path / "ref.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(image)
    audio = tmp_path / "seg.wav"
    n = frames * 1000
    sf.write(audio, (0.1 * rng.standard_normal(n)).astype(np.float32), 16_000, subtype="PCM_16")
    clips = -(-frames // INFER)
    seg = Segment(index=2, start_sample=0, end_sample=n, start_s=0.0, end_s=n / 16_000, frames=frames,
                  clips=clips, seed=seed)  # fmt: skip
    return SegmentJob(row_id="r", segment=seg, image=str(image), audio=str(audio), prompt="p",
                      width=W, height=H, infer_frames=INFER)  # fmt: skip


def _ffprobe_frames(path: Path) -> tuple[int, str, str, str]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
         "stream=nb_read_frames,codec_name,pix_fmt,r_frame_rate", "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    s = json.loads(out.stdout)["streams"][0]
    return int(s["nb_read_frames"]), s["codec_name"], s["pix_fmt"], s["r_frame_rate"]


def test_writes_every_clip_with_state_and_trims_the_last(tmp_path: Path) -> None:
    job = _job(tmp_path, frames=20)  # 8 + 8 + 4 frames
    seg_dir = tmp_path / "seg"
    seen: list[ClipResult] = []
    result = generate_segment(job, PreviewGenerator(), seg_dir, on_clip=seen.append)
    assert result.backend == "preview" and result.segment_index == 2
    assert result.frames == 20 and [c.frames for c in result.clips] == [8, 8, 4]
    assert [c.index for c in seen] == [0, 1, 2] and not any(c.reused for c in seen)
    for k in range(3):
        assert _ffprobe_frames(clip_path(seg_dir, k)) == ((8, 8, 4)[k], "h264", "yuv420p", "16/1")
        with np.load(state_path(seg_dir, k)) as st:
            assert int(st["next_frame"][0]) == (k + 1) * INFER
        assert result.clips[k].state == str(state_path(seg_dir, k))
    assert not list(seg_dir.glob("*.part*"))


def test_resumes_at_first_missing_clip_with_identical_output(tmp_path: Path) -> None:
    job = _job(tmp_path, frames=20)
    seg_dir = tmp_path / "seg"
    generate_segment(job, PreviewGenerator(), seg_dir)
    before = {k: clip_path(seg_dir, k).read_bytes() for k in range(3)}
    mtimes = {k: clip_path(seg_dir, k).stat().st_mtime_ns for k in range(2)}
    clip_path(seg_dir, 2).unlink()

    gen = RecordingPreview()
    result = generate_segment(job, gen, seg_dir)
    assert [c.reused for c in result.clips] == [True, True, False]
    assert result.reused_clips == 2 and result.frames == 20
    # Called once, from clip 2, with the state saved after clip 1.
    assert len(gen.calls) == 1 and gen.calls[0][0] == 2
    assert int(gen.calls[0][1]["next_frame"][0]) == 2 * INFER
    assert clip_path(seg_dir, 2).read_bytes() == before[2]
    assert {k: clip_path(seg_dir, k).stat().st_mtime_ns for k in range(2)} == mtimes

    # Nothing missing: everything is reused and the backend is not asked for anything.
    gen = RecordingPreview()
    result = generate_segment(job, gen, seg_dir)
    assert all(c.reused for c in result.clips) and gen.calls == []


def test_damaged_clip_or_state_is_regenerated(tmp_path: Path) -> None:
    job = _job(tmp_path, frames=20)
    seg_dir = tmp_path / "seg"
    generate_segment(job, PreviewGenerator(), seg_dir)
    good = clip_path(seg_dir, 1).read_bytes()
    clip_path(seg_dir, 1).write_bytes(good[: len(good) // 3])
    # A backend failing right after redoing clip 1 must not leave the old clip 2 to be reused.
    with pytest.raises(RuntimeError, match="stopped after clip 1"):
        generate_segment(job, StopsAfterFirst(), seg_dir)
    assert clip_path(seg_dir, 1).exists() and not clip_path(seg_dir, 2).exists()
    result = generate_segment(job, PreviewGenerator(), seg_dir)
    assert [c.reused for c in result.clips] == [True, True, False]
    assert clip_path(seg_dir, 1).read_bytes() == good

    # A damaged state file cannot seed clip 2: clip 1 is redone from clip 0's state.
    state_path(seg_dir, 1).write_bytes(b"not a zip")
    clip_path(seg_dir, 2).unlink()
    gen = RecordingPreview()
    result = generate_segment(job, gen, seg_dir)
    assert [c.reused for c in result.clips] == [True, False, False]
    assert gen.calls[0][0] == 1 and int(gen.calls[0][1]["next_frame"][0]) == INFER
    with np.load(state_path(seg_dir, 1)) as st:
        assert int(st["next_frame"][0]) == 2 * INFER


def test_changed_job_does_not_reuse_stale_clips(tmp_path: Path) -> None:
    seg_dir = tmp_path / "seg"
    generate_segment(_job(tmp_path, frames=20, seed=1), PreviewGenerator(), seg_dir)
    result = generate_segment(_job(tmp_path, frames=20, seed=2), PreviewGenerator(), seg_dir)
    assert not any(c.reused for c in result.clips)


def test_state_is_written_before_the_clip(tmp_path: Path) -> None:
    # The state cannot be saved: the clip must not appear either, so "clip exists"
    # always implies "its state exists".
    seg_dir = tmp_path / "seg"
    with pytest.raises(ValueError, match="allow_pickle"):
        generate_segment(_job(tmp_path, frames=20), UnsavableState(), seg_dir)
    assert not clip_path(seg_dir, 0).exists() and not state_path(seg_dir, 0).exists()
    assert not list(seg_dir.glob("*.part*"))


def test_write_segment_audio_is_sample_exact(tmp_path: Path) -> None:
    src = tmp_path / "row16k.wav"
    data = np.random.default_rng(0).integers(-32768, 32767, 48_000, dtype=np.int16)
    sf.write(src, data, 16_000, subtype="PCM_16")
    seg = Segment(index=1, start_sample=12_345, end_sample=40_001, start_s=12_345 / 16_000, end_s=40_001 / 16_000,
                  frames=35, clips=1, seed=1)  # fmt: skip
    out = write_segment_audio(src, seg, tmp_path / "seg" / "audio.wav")
    got, rate = sf.read(out, dtype="int16")
    assert rate == 16_000 and np.array_equal(got, data[12_345:40_001])

    bad = seg.model_copy(update={"end_sample": 48_001})
    with pytest.raises(ValueError, match="outside"):
        write_segment_audio(src, bad, tmp_path / "x.wav")
    sf.write(tmp_path / "r44.wav", data, 44_100)
    with pytest.raises(ValueError, match="16000 Hz"):
        write_segment_audio(tmp_path / "r44.wav", seg, tmp_path / "y.wav")
