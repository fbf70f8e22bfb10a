"""The per-segment driver: clip and state files, trimming, resume, stale clips, audio cuts."""

from __future__ import annotations

import json
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tasks.generate.base import GeneratedClip
from tasks.generate.preview import PreviewGenerator
from tasks.generate.stage import (
    clip_path,
    generate_segment,
    load_state,
    save_state,
    state_path,
    write_segment_audio,
)
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


class StopsAfter(PreviewGenerator):
    """The preview backend, ending early (as a crashed worker would) after `n` clips."""

    def __init__(self, n: int = 1) -> None:
        super().__init__()
        self.n = n

    def clips(self, job: SegmentJob, start_clip: int = 0, state: dict | None = None) -> Iterator[GeneratedClip]:
        for k, clip in enumerate(super().clips(job, start_clip, state)):
            if k == self.n:
                return
            yield clip


class Stateless(PreviewGenerator):
    """The preview backend yielding no state (as a backend whose clips are independent would)."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.stop_after = stop_after
        self.starts: list[int] = []

    def clips(self, job: SegmentJob, start_clip: int = 0, state: dict | None = None) -> Iterator[GeneratedClip]:
        self.starts.append(start_clip)
        for k, clip in enumerate(super().clips(job, start_clip, None)):
            if k == self.stop_after:
                return
            clip.state = {}
            yield clip


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


def states_on_disk(seg_dir: Path) -> list[str]:
    return sorted(p.name for p in seg_dir.glob("*.state.*"))


def test_writes_every_clip_keeps_only_the_resume_state_and_trims_the_last(tmp_path: Path) -> None:
    job = _job(tmp_path, frames=20)  # 8 + 8 + 4 frames
    seg_dir = tmp_path / "seg"
    seen: list[tuple[ClipResult, list[str], dict | None]] = []

    def on_clip(clip: ClipResult) -> None:  # what a resume would find at this moment
        seen.append((clip, states_on_disk(seg_dir), load_state(Path(clip.state)) if clip.state else None))

    result = generate_segment(job, PreviewGenerator(), seg_dir, on_clip=on_clip)
    assert result.backend == "preview" and result.segment_index == 2
    assert result.frames == 20 and [c.frames for c in result.clips] == [8, 8, 4]
    assert [c.index for c, _, _ in seen] == [0, 1, 2] and not any(c.reused for c, _, _ in seen)
    for k in range(3):
        assert _ffprobe_frames(clip_path(seg_dir, k)) == ((8, 8, 4)[k], "h264", "yuv420p", "16/1")
    # After clips 0 and 1 only their own state is on disk; the last clip needs none, and a done
    # segment keeps none.
    assert [names for _, names, _ in seen] == [[state_path(seg_dir, 0).name], [state_path(seg_dir, 1).name], []]
    assert [int(st["next_frame"][0]) for _, _, st in seen[:2]] == [INFER, 2 * INFER] and seen[2][2] is None
    assert states_on_disk(seg_dir) == [] and all(c.state is None for c in result.clips)
    assert result.gpu_s > 0 and result.compute_s == 0.0  # a CPU backend reports no device time
    assert not list(seg_dir.glob("*.part*"))


def test_resumes_at_first_missing_clip_from_the_kept_state_with_identical_output(tmp_path: Path) -> None:
    job = _job(tmp_path, frames=20)
    clean = generate_segment(job, PreviewGenerator(), tmp_path / "clean")
    seg_dir = tmp_path / "seg"
    with pytest.raises(RuntimeError, match="stopped after clip 1"):
        generate_segment(job, StopsAfter(2), seg_dir)
    assert states_on_disk(seg_dir) == [state_path(seg_dir, 1).name]
    mtimes = {k: clip_path(seg_dir, k).stat().st_mtime_ns for k in range(2)}

    gen = RecordingPreview()
    result = generate_segment(job, gen, seg_dir)
    assert [c.reused for c in result.clips] == [True, True, False]
    assert result.reused_clips == 2 and result.frames == 20
    # Called once, from clip 2, with the state saved after clip 1.
    assert len(gen.calls) == 1 and gen.calls[0][0] == 2
    assert int(gen.calls[0][1]["next_frame"][0]) == 2 * INFER
    assert [clip_path(seg_dir, k).read_bytes() for k in range(3)] == [Path(c.path).read_bytes() for c in clean.clips]
    assert {k: clip_path(seg_dir, k).stat().st_mtime_ns for k in range(2)} == mtimes
    assert states_on_disk(seg_dir) == []

    # Nothing missing: everything is reused and the backend is not asked for anything.
    gen = RecordingPreview()
    result = generate_segment(job, gen, seg_dir)
    assert all(c.reused for c in result.clips) and gen.calls == []


def test_damaged_or_missing_state_redoes_the_clips_it_cannot_continue(tmp_path: Path) -> None:
    job = _job(tmp_path, frames=20)
    seg_dir = tmp_path / "seg"
    clean = [Path(c.path).read_bytes() for c in generate_segment(job, PreviewGenerator(), tmp_path / "clean").clips]

    # A damaged state cannot seed clip 2, and older states are not kept: the segment starts over.
    with pytest.raises(RuntimeError):
        generate_segment(job, StopsAfter(2), seg_dir)
    state_path(seg_dir, 1).write_bytes(b"not a zip")
    gen = RecordingPreview()
    result = generate_segment(job, gen, seg_dir)
    assert [c.reused for c in result.clips] == [False, False, False] and gen.calls == [(0, None)]
    assert [clip_path(seg_dir, k).read_bytes() for k in range(3)] == clean

    # A finished segment keeps no state: a clip cut short later is redone from the start, identically.
    good = clip_path(seg_dir, 2).read_bytes()
    clip_path(seg_dir, 2).write_bytes(good[: len(good) // 3])
    result = generate_segment(job, PreviewGenerator(), seg_dir)
    assert not any(c.reused for c in result.clips) and clip_path(seg_dir, 2).read_bytes() == good

    # A run stopped between writing clip 2 and dropping clip 1's state left both: the newer one is used.
    with pytest.raises(RuntimeError):
        generate_segment(job, StopsAfter(1), tmp_path / "crash")
    crash = tmp_path / "crash"
    older = state_path(crash, 0).read_bytes()
    with pytest.raises(RuntimeError):
        generate_segment(job, StopsAfter(1), crash)  # resumes at clip 1, writes its state, drops clip 0's
    state_path(crash, 0).write_bytes(older)
    gen = RecordingPreview()
    result = generate_segment(job, gen, crash)
    assert [c.reused for c in result.clips] == [True, True, False] and gen.calls[0][0] == 2
    assert states_on_disk(crash) == []


def test_a_stateless_backend_resumes_too(tmp_path: Path) -> None:
    job = _job(tmp_path, frames=20)
    seg_dir = tmp_path / "seg"
    with pytest.raises(RuntimeError):
        generate_segment(job, Stateless(stop_after=1), seg_dir)
    assert load_state(state_path(seg_dir, 0)) == {}  # an empty state marks where to continue
    gen = Stateless()
    result = generate_segment(job, gen, seg_dir)
    assert [c.reused for c in result.clips] == [True, False, False] and gen.starts == [1]


def test_states_round_trip_bit_for_bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    odd = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, np.float32(np.pi)], np.float32)
    odd_nan = odd.view(np.uint32).copy()
    odd_nan[0] = 0x7FC0_0123  # a NaN with a payload
    state = {
        "motion_frames": rng.standard_normal((3, 5, 16, 24)).astype(np.float32),
        "odd": odd_nan.view(np.float32),
        "half": rng.standard_normal((4, 4)).astype(np.float16),
        "next_clip": np.array(3, np.int64),
        "empty": np.zeros((0, 7), np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((5, 6))),
    }
    path = tmp_path / "s.state.zip"
    save_state(state, path)
    back = load_state(path)
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert back[key].tobytes(order="C") == np.ascontiguousarray(value).tobytes(), key
    # Lossless and smaller: float32 noise compresses a little, zeros a lot.
    zeros = {"motion_frames": np.zeros((3, 73, 64, 64), np.float32)}
    save_state(zeros, path)
    assert path.stat().st_size < zeros["motion_frames"].nbytes / 50
    # A damaged file is an error the stage can catch, not garbage.
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises((ValueError, zipfile.BadZipFile, OSError)):
        load_state(path)


def test_changed_job_does_not_reuse_stale_clips(tmp_path: Path) -> None:
    seg_dir = tmp_path / "seg"
    generate_segment(_job(tmp_path, frames=20, seed=1), PreviewGenerator(), seg_dir)
    result = generate_segment(_job(tmp_path, frames=20, seed=2), PreviewGenerator(), seg_dir)
    assert not any(c.reused for c in result.clips)


def test_state_is_written_before_the_clip(tmp_path: Path) -> None:
    # The state cannot be saved: the clip must not appear either, so "the last clip exists"
    # always implies "its state exists".
    seg_dir = tmp_path / "seg"
    with pytest.raises(ValueError, match="state 'bad': object cannot be stored"):
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


class Interrupted:
    """Any generator, stopped after `n` clips (as a lost worker would be)."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n, self.name = inner, n, inner.name

    def clips(self, job: SegmentJob, start_clip: int = 0, state: dict | None = None) -> Iterator[GeneratedClip]:
        for k, clip in enumerate(self.inner.clips(job, start_clip, state)):
            if k == self.n:
                return
            yield clip


@pytest.mark.slow
def test_tiny_wan_s2v_resumed_from_a_stored_state_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """The real architecture (random weights, CPU): the compressed state carries the clip loop over bit for bit."""
    from paced import tiny_s2v_job

    from tasks.generate.wan_s2v import WanS2VGenerator

    checkpoint, job = tiny_s2v_job(tmp_path)
    job = job.model_copy(update={"segment": job.segment.model_copy(update={"clips": 2, "frames": 8})})
    generator = WanS2VGenerator(checkpoint, device="cpu")

    def run(gen, seg_dir: Path, states: dict) -> None:
        def keep(clip: ClipResult) -> None:
            if clip.state and not clip.reused:
                states[clip.index] = load_state(Path(clip.state))

        generate_segment(job, gen, seg_dir, on_clip=keep)

    clean_states: dict = {}
    run(generator, tmp_path / "clean", clean_states)
    resumed_states: dict = {}
    with pytest.raises(RuntimeError, match="stopped after clip 0"):
        run(Interrupted(generator, 1), tmp_path / "resumed", resumed_states)
    assert states_on_disk(tmp_path / "resumed") == [state_path(tmp_path / "resumed", 0).name]
    run(generator, tmp_path / "resumed", resumed_states)

    assert sorted(clean_states) == sorted(resumed_states) == [0]  # the last clip needs no state
    for k, state in clean_states.items():
        assert state.keys() == resumed_states[k].keys() and "motion_frames" in state
        for key, value in state.items():
            assert value.dtype == resumed_states[k][key].dtype
            assert value.tobytes() == resumed_states[k][key].tobytes(), (k, key)
    for k in range(job.segment.clips):
        assert clip_path(tmp_path / "clean", k).read_bytes() == clip_path(tmp_path / "resumed", k).read_bytes()
    assert states_on_disk(tmp_path / "clean") == states_on_disk(tmp_path / "resumed") == []
