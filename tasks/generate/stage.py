"""The per-segment driver every backend runs through: clip files, state files, resume.

A segment's folder holds, per clip `k`, `clip_{k:04d}.mp4` (video only) and, when the
backend carries state, `clip_{k:04d}.state.npz`. The state file is renamed into place
before the clip file, so "the clip file exists" implies "its state exists", and a
segment interrupted at any point resumes at its first missing clip from the state of
the clip before it. `segment.json` records which job and backend wrote the clips, so a
changed job (other seed, prompt, image, audio, backend) never reuses stale clips.

The last clip is trimmed here to the segment's planned `frames`: backends always yield
whole clips (the model cannot make fewer than `infer_frames`), and trimming per segment
keeps the concatenated segments in step with their audio.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from tasks.generate.base import GeneratedClip, Generator
from tasks.media import ffmpeg_exe
from tasks.records import MODEL_SAMPLE_RATE, ClipResult, Segment, SegmentJob, SegmentResult
from tasks.storage import atomic_local, file_digest

CLIP_CRF = 14
"""x264 quality of the intermediate clips: visually lossless, re-encoded at most once."""
X264_ARGS = [
    "-c:v", "libx264",
    "-preset", "medium",
    "-profile:v", "high",
    "-pix_fmt", "yuv420p",
    "-colorspace", "bt709",
    "-color_primaries", "bt709",
    "-color_trc", "bt709",
    "-color_range", "tv",
]  # fmt: skip
"""Encoder settings shared by every clip (and stitch re-encodes), so clips concatenate by copy."""
RGB_TO_YUV = "scale=out_color_matrix=bt709:out_range=tv"
"""Convert with the matrix the stream is tagged with (swscale defaults to BT.601)."""
MARKER = "segment.json"


def clip_path(seg_dir: Path, index: int) -> Path:
    return Path(seg_dir) / f"clip_{index:04d}.mp4"


def state_path(seg_dir: Path, index: int) -> Path:
    return Path(seg_dir) / f"clip_{index:04d}.state.npz"


def clip_frames(job: SegmentJob, index: int) -> int:
    """Frames clip `index` keeps after trimming to the segment's planned length."""
    return max(0, min(job.infer_frames, job.segment.frames - index * job.infer_frames))


def encode_frames(frames: np.ndarray, dest: Path, fps: int, *, crf: int = CLIP_CRF) -> None:
    """Encode uint8 RGB frames (T, H, W, 3) as H.264 yuv420p MP4 at `dest` (not atomic)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected non-empty uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs an even frame size, got {w}x{h}")
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", str(fps), "-i", "pipe:0",
        "-an", "-vf", RGB_TO_YUV, *X264_ARGS, "-crf", str(crf),
        "-fflags", "+bitexact", "-movflags", "+faststart", "-f", "mp4", str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed encoding {dest.name}: {proc.stderr.decode(errors='replace')[-2000:]}")


def _file_digest(path: str | None) -> str | None:
    return file_digest(path) if path else None


def job_fingerprint(job: SegmentJob, generator: Generator) -> str:
    """Identity of what the clips depend on: job fields, input contents (not paths), backend.

    A backend may expose a `fingerprint` string (e.g. checkpoint and precision) to make
    clips from another configuration stale too.
    """
    fields = job.model_dump(mode="json", exclude={"image", "audio", "pose_video"})
    for key, default in (("preset", "exact"), ("speed", None), ("loras", [])):
        if fields[key] == default:  # exact without LoRAs: the identity clips had before these options existed
            del fields[key]
    fields["inputs"] = {k: _file_digest(getattr(job, k)) for k in ("image", "audio", "pose_video")}
    fields["backend"] = [generator.name, str(getattr(generator, "fingerprint", ""))]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _prepare_dir(job: SegmentJob, generator: Generator, seg_dir: Path) -> None:
    """Make `seg_dir` belong to this job: clear clips left by a different job or backend."""
    seg_dir.mkdir(parents=True, exist_ok=True)
    marker = seg_dir / MARKER
    want = {"backend": generator.name, "fingerprint": job_fingerprint(job, generator)}
    try:
        have = json.loads(marker.read_text())
    except (FileNotFoundError, ValueError):
        have = None
    if have == want:
        return
    for stale in [*seg_dir.glob("clip_*.mp4"), *seg_dir.glob("clip_*.state.npz")]:
        stale.unlink()
    with atomic_local(marker) as tmp:
        tmp.write_text(json.dumps(want, indent=1))


def _whole_clip(path: Path, frames: int) -> bool:
    """True when `path` holds `frames` complete video packets.

    Atomic renames rule out half-written clips from our own crashes, but a clip copied
    back from elsewhere may be cut short; with +faststart the header still claims every
    frame, so the packets themselves are read (no decoding: milliseconds per clip).
    """
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.frames != frames:
                return False
            size = path.stat().st_size
            count = 0
            for packet in container.demux(stream):
                if packet.size:
                    count += 1
                    if packet.pos is not None and packet.pos + packet.size > size:
                        return False
            return count == frames
    except (ValueError, IndexError):  # unreadable (PyAV errors are ValueErrors) or no video stream
        return False


def _finished_clips(job: SegmentJob, seg_dir: Path) -> int:
    """Number of leading clips already on disk and whole."""
    for k in range(job.segment.clips):
        path = clip_path(seg_dir, k)
        if not path.exists() or not _whole_clip(path, clip_frames(job, k)):
            return k
    return job.segment.clips


def _load_state(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _check_clip(clip: GeneratedClip, job: SegmentJob, expected_index: int) -> np.ndarray:
    if clip.index != expected_index:
        raise RuntimeError(f"backend yielded clip {clip.index}, expected clip {expected_index}")
    f = clip.frames
    want = (job.height, job.width, 3)
    if f.dtype != np.uint8 or f.ndim != 4 or tuple(f.shape[1:]) != want:
        raise RuntimeError(f"clip {clip.index}: frames {f.dtype} {f.shape}, expected uint8 (T, {want})")
    keep = clip_frames(job, clip.index)
    if len(f) < keep:
        raise RuntimeError(f"clip {clip.index}: {len(f)} frames, the plan needs {keep}")
    return f[:keep]


def generate_segment(
    job: SegmentJob,
    generator: Generator,
    seg_dir: Path,
    *,
    on_clip: Callable[[ClipResult], None] | None = None,
) -> SegmentResult:
    """Render `job` clip by clip into `seg_dir`, resuming at the first missing clip.

    Clips already finished are reported with `reused=True`; `on_clip` is called for each
    clip (reused ones first) as soon as its file is in place.
    """
    seg_dir = Path(seg_dir)
    seg = job.segment
    _prepare_dir(job, generator, seg_dir)
    start = _finished_clips(job, seg_dir)
    state: dict[str, np.ndarray] | None = None
    # The state to continue from must load; if it does not, its clip is redone as well.
    while start > 0 and start < seg.clips:
        sp = state_path(seg_dir, start - 1)
        try:
            state = _load_state(sp) if sp.exists() else {}
            break
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            start -= 1
    results: list[ClipResult] = []

    def report(result: ClipResult) -> None:
        results.append(result)
        if on_clip is not None:
            on_clip(result)

    for k in range(start):
        sp = state_path(seg_dir, k)
        report(
            ClipResult(
                index=k,
                path=str(clip_path(seg_dir, k)),
                frames=clip_frames(job, k),
                state=str(sp) if sp.exists() else None,
                reused=True,
            )
        )

    if start < seg.clips:
        # Later clips on disk continued from a clip about to be redone: never mix them in.
        for k in range(start, seg.clips):
            clip_path(seg_dir, k).unlink(missing_ok=True)
            state_path(seg_dir, k).unlink(missing_ok=True)
        expected = start
        for clip in generator.clips(job, start_clip=start, state=state):
            frames = _check_clip(clip, job, expected)
            sp = state_path(seg_dir, clip.index)
            if clip.state:
                with atomic_local(sp) as tmp, open(tmp, "wb") as f:
                    # Plain arrays only: states are loaded back with allow_pickle=False.
                    np.savez(f, allow_pickle=False, **clip.state)
            else:
                sp.unlink(missing_ok=True)
            cp = clip_path(seg_dir, clip.index)
            with atomic_local(cp) as tmp:
                encode_frames(frames, tmp, job.fps)
            report(
                ClipResult(
                    index=clip.index,
                    path=str(cp),
                    frames=len(frames),
                    state=str(sp) if clip.state else None,
                    gpu_s=clip.gpu_s,
                    forwards=clip.forwards,
                )
            )
            expected += 1
            if expected == seg.clips:
                break
        if expected != seg.clips:
            raise RuntimeError(f"backend {generator.name!r} stopped after clip {expected - 1} of {seg.clips}")

    return SegmentResult(
        segment_index=seg.index,
        backend=generator.name,
        clips=results,
        frames=sum(c.frames for c in results),
        gpu_s=sum(c.gpu_s for c in results),
        forwards=sum(c.forwards for c in results),
    )


def write_segment_audio(audio_16k: Path, segment: Segment, dest: Path) -> Path:
    """Cut samples `segment.start_sample:end_sample` of the row's 16 kHz WAV into `dest`."""
    info = sf.info(str(audio_16k))
    if info.samplerate != MODEL_SAMPLE_RATE:
        raise ValueError(f"{audio_16k}: {info.samplerate} Hz, expected {MODEL_SAMPLE_RATE} Hz")
    if not 0 <= segment.start_sample < segment.end_sample <= info.frames:
        raise ValueError(
            f"segment {segment.index} samples {segment.start_sample}:{segment.end_sample} "
            f"outside the audio's {info.frames} samples"
        )
    # Read and write in the file's own sample type: no float round trip, a bit-exact cut.
    dtype = {"PCM_16": "int16", "PCM_32": "int32", "FLOAT": "float32"}.get(info.subtype, "float64")
    subtype = info.subtype if info.subtype in ("PCM_16", "PCM_32", "FLOAT") else "DOUBLE"
    data, rate = sf.read(str(audio_16k), start=segment.start_sample, stop=segment.end_sample, dtype=dtype)
    with atomic_local(dest) as tmp:
        sf.write(str(tmp), data, rate, subtype=subtype, format="WAV")
    return Path(dest)
