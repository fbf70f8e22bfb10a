"""The per-segment driver every backend runs through: clip files, state files, resume.

A segment's folder holds, per clip `k`, `clip_{k:04d}.mp4` (video only) and, while the
segment is unfinished, the continuation state of its last finished clip,
`clip_{k:04d}.state.zip`. That state is renamed into place before its clip file, and the
state of the clip before is deleted only after, so "the last clip file exists" implies
"its state exists", and a segment interrupted at any point resumes at its first missing
clip from the state of the clip before it. Older states are never needed again, and once
the segment's last clip is written no state is: the folder then holds clips only. This
keeps the work folder bounded: the model's state is ~0.36 GB of float32 per 480p clip,
which kept for every clip came to ~43 GB for a 10-minute row.

States are stored losslessly compressed (`save_state`): a zip of one Blosc2 frame per
array, zstd level 1 behind a byte shuffle. On float32 model states this gives about
0.75 of the raw size in ~1 s where `np.savez_compressed` gives 0.86 in ~30 s of one core
(bench/disk_use.py): the worker writes the state while its GPU waits, so speed counts.
`segment.json` records which job and backend wrote the clips, so a changed job (other
seed, prompt, image, audio, backend) never reuses stale clips.

The last clip is trimmed here to the segment's planned `frames`: backends always yield
whole clips (the model cannot make fewer than `infer_frames`), and trimming per segment
keeps the concatenated segments in step with their audio.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import av
import blosc2
import numpy as np
import soundfile as sf

from tasks.generate.base import GeneratedClip, Generator
from tasks.media import run_ffmpeg
from tasks.records import DEFAULT_PRECISION, MODEL_SAMPLE_RATE, ClipResult, Segment, SegmentJob, SegmentResult
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
STATE_SUFFIX = ".state.zip"
STATE_GLOB = "clip_*" + STATE_SUFFIX
STATE_CPARAMS = blosc2.CParams(codec=blosc2.Codec.ZSTD, clevel=1, filters=[blosc2.Filter.SHUFFLE])
"""Higher zstd levels gain under 1 % on float32 states at several times the time (bench/disk_use.py)."""
_FRAME = ".b2nd"
_OLD_STATE_GLOB = "clip_*.state.npz"
"""Uncompressed states of earlier versions: never read, deleted with the segment's states."""


def clip_path(seg_dir: Path, index: int) -> Path:
    return Path(seg_dir) / f"clip_{index:04d}.mp4"


def state_path(seg_dir: Path, index: int) -> Path:
    return Path(seg_dir) / f"clip_{index:04d}{STATE_SUFFIX}"


def save_state(state: dict[str, np.ndarray], dest: Path) -> None:
    """Write `state` to `dest` atomically and losslessly: a zip (stored) of one Blosc2 frame per array.

    Plain numeric arrays only: states come back without unpickling anything.
    """
    for key, value in state.items():
        if not isinstance(value, np.ndarray) or value.dtype.hasobject:
            kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise ValueError(f"state {key!r}: {kind} cannot be stored (states hold numeric arrays only)")
    with atomic_local(dest) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for key, value in state.items():
            frame = blosc2.asarray(np.require(value, requirements="C"), cparams=STATE_CPARAMS).to_cframe()
            archive.writestr(key + _FRAME, frame)


def load_state(path: Path) -> dict[str, np.ndarray]:
    """The arrays `save_state` wrote, bit for bit; raises OSError, ValueError or zipfile.BadZipFile when damaged."""
    with zipfile.ZipFile(path) as archive:
        state = {}
        for name in archive.namelist():
            if not name.endswith(_FRAME):
                raise ValueError(f"{path.name}: unexpected member {name!r}")
            try:
                state[name.removesuffix(_FRAME)] = np.asarray(blosc2.ndarray_from_cframe(archive.read(name))[...])
            except RuntimeError as exc:  # Blosc2 reports a damaged frame as a RuntimeError
                raise ValueError(f"{path.name}: member {name!r} is damaged ({exc})") from None
        return state


def drop_states(seg_dir: Path, keep: int | None = None) -> None:
    """Delete the segment's state files except clip `keep`'s (and any `.state.npz` of earlier versions)."""
    for path in [*Path(seg_dir).glob(STATE_GLOB), *Path(seg_dir).glob(_OLD_STATE_GLOB)]:
        if keep is None or path != state_path(seg_dir, keep):
            path.unlink(missing_ok=True)


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
    args = [
        "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", str(fps), "-i", "pipe:0",
        "-an", "-vf", RGB_TO_YUV, *X264_ARGS, "-crf", str(crf),
        "-fflags", "+bitexact", "-movflags", "+faststart", "-f", "mp4", str(dest),
    ]  # fmt: skip
    run_ffmpeg(args, input=np.ascontiguousarray(frames).tobytes(), what=f"encoding {dest.name}")


def _file_digest(path: str | None) -> str | None:
    return file_digest(path) if path else None


def job_fingerprint(job: SegmentJob, generator: Generator) -> str:
    """Identity of what the clips depend on: job fields, input contents (not paths), backend.

    A backend may expose a `fingerprint` string (e.g. checkpoint and precision) to make
    clips from another configuration stale too.
    """
    fields = job.model_dump(mode="json", exclude={"image", "audio", "pose_video"})
    # Options at their defaults (exact, no LoRAs, bf16) are left out: the identity clips had before they existed.
    defaults = (("preset", "exact"), ("speed", None), ("loras", []), ("mode", None), ("distilled_lora", None),
                ("precision", DEFAULT_PRECISION))
    for key, default in defaults:
        if fields[key] == default:
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
    for stale in seg_dir.glob("clip_*.mp4"):
        stale.unlink()
    drop_states(seg_dir)
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
    clip (reused ones first) as soon as its file is in place, with the state file to
    continue from while that is kept (see the module docstring). The result holds no
    state: a finished segment keeps none. Its `gpu_s` is this call's wall time; callers
    that retry add their other attempts (tasks/records.py, `SegmentResult.gpu_s`).
    """
    started = time.monotonic()
    seg_dir = Path(seg_dir)
    seg = job.segment
    _prepare_dir(job, generator, seg_dir)
    start = _finished_clips(job, seg_dir)
    state: dict[str, np.ndarray] | None = None
    # The state to continue from must load. Only the last finished clip's is kept, so when it
    # does not load (damaged, or lost) the segment goes back to an older state a crash left
    # behind, or to its start; the clips after it are redone (deterministically: same bytes).
    while 0 < start < seg.clips:
        try:
            state = load_state(state_path(seg_dir, start - 1))
            break
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            start -= 1
    results: list[ClipResult] = []

    def report(result: ClipResult) -> None:
        results.append(result)
        if on_clip is not None:
            on_clip(result)

    for k in range(start):
        resume_from = k == start - 1 and start < seg.clips
        report(
            ClipResult(
                index=k,
                path=str(clip_path(seg_dir, k)),
                frames=clip_frames(job, k),
                state=str(state_path(seg_dir, k)) if resume_from else None,
                reused=True,
            )
        )

    if start < seg.clips:
        # Later clips on disk continued from a clip about to be redone: never mix them in.
        for k in range(start, seg.clips):
            clip_path(seg_dir, k).unlink(missing_ok=True)
        drop_states(seg_dir, keep=start - 1 if start else None)
        expected = start
        for clip in generator.clips(job, start_clip=start, state=state):
            frames = _check_clip(clip, job, expected)
            last = clip.index == seg.clips - 1
            sp = None if last else state_path(seg_dir, clip.index)
            if sp is not None:  # written even when empty: a stateless backend resumes from it too
                save_state(clip.state, sp)
            cp = clip_path(seg_dir, clip.index)
            with atomic_local(cp) as tmp:
                encode_frames(frames, tmp, job.fps)
            drop_states(seg_dir, keep=None if last else clip.index)
            report(
                ClipResult(
                    index=clip.index,
                    path=str(cp),
                    frames=len(frames),
                    state=str(sp) if sp else None,
                    compute_s=clip.gpu_s,
                    forwards=clip.forwards,
                    timings=clip.timings,
                )
            )
            expected += 1
            if last:
                break
        if expected != seg.clips:
            raise RuntimeError(f"backend {generator.name!r} stopped after clip {expected - 1} of {seg.clips}")
    else:
        drop_states(seg_dir)  # left by a run stopped between its last clip and the clean-up

    return SegmentResult(
        segment_index=seg.index,
        backend=generator.name,
        clips=[c.model_copy(update={"state": None}) for c in results],
        frames=sum(c.frames for c in results),
        gpu_s=round(time.monotonic() - started, 3),
        compute_s=round(sum(c.compute_s for c in results), 3),
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
