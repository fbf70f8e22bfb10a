"""Shared media plumbing: the ffmpeg binary, the one way to run it, and stream probing.

Every ffmpeg run of the project goes through `run_ffmpeg`: the same static binary, the same
flags, the same error. Filter graphs too complex to spell as strings (tasks/normalize/audio.py)
are built with ffmpeg-python and run here from its argument list. imageio-ffmpeg ships a static
ffmpeg but no ffprobe, so probing goes through PyAV, which bundles the same FFmpeg libraries
and reads container metadata directly.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import imageio_ffmpeg


@functools.cache
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: imageio-ffmpeg's static build, else one on PATH."""
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:
        found = shutil.which("ffmpeg")
        if found is None:
            raise RuntimeError("no ffmpeg binary found (install imageio-ffmpeg)") from None
        return found


class FFmpegError(RuntimeError):
    """ffmpeg exited with an error; the message says what failed, `stderr` holds what ffmpeg wrote."""

    def __init__(self, message: str, stderr: bytes):
        super().__init__(message)
        self.stderr = stderr

    @property
    def last_line(self) -> str:
        """The line that names the cause, for one-line messages: an error of the system (a full disk)
        where ffmpeg wrote one, else its last meaningful line ("Conversion failed!" says nothing alone)."""
        lines = [ln.strip() for ln in self.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        if causes := [ln for ln in lines if any(e in ln for e in SYSTEM_ERRORS)]:
            return causes[-1]
        meaningful = [ln for ln in lines if ln != "Conversion failed!"]
        return (meaningful or lines or ["ffmpeg failed"])[-1]


SYSTEM_ERRORS = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied")


def run_ffmpeg(
    args: Sequence[str], *, input: bytes | memoryview | None = None, cwd: str | Path | None = None,  # noqa: A002
    what: str = "running",
) -> tuple[bytes, bytes]:
    """Run ffmpeg with `args` (without the binary); returns (stdout, stderr). FFmpegError("ffmpeg failed
    <what>: <its last output>") when it fails. Without `input`, ffmpeg reads nothing from stdin."""
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", *args], input=input, cwd=cwd, capture_output=True,
                          stdin=subprocess.DEVNULL if input is None else None)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace")[-2000:]
        raise FFmpegError(f"ffmpeg failed {what}: {tail}", proc.stderr)
    return proc.stdout, proc.stderr


@dataclass(frozen=True)
class MediaInfo:
    """What probing a media file tells us."""

    duration_s: float | None
    has_audio: bool
    has_video: bool
    audio_codec: str | None = None
    """The decoder's name ("mp3float", "libopus")."""
    audio_format: str | None = None
    """The format's codec name ("mp3", "opus"), for reports."""
    sample_rate: int | None = None
    channels: int | None = None
    video_codec: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    video_frames: int | None = None
    audio_duration_s: float | None = None
    """The audio stream's own duration where the container records it (a video's soundtrack may end
    before its picture, so the container's duration is not the sound's)."""


def probe(path: str | Path) -> MediaInfo:
    """Read stream metadata; raises av.error.FFmpegError (a ValueError) on unreadable input."""
    with av.open(str(path)) as container:
        duration = container.duration / 1_000_000 if container.duration else None
        audio = next(iter(container.streams.audio), None)
        video = next(iter(container.streams.video), None)
        info = {
            "duration_s": duration,
            "has_audio": audio is not None,
            "has_video": video is not None,
        }
        if audio is not None:
            info.update(
                audio_codec=audio.codec_context.name,
                audio_format=getattr(audio.codec_context.codec, "canonical_name", None),
                sample_rate=audio.codec_context.sample_rate,
                channels=audio.codec_context.channels,
                audio_duration_s=(float(audio.duration * audio.time_base)
                                  if audio.duration and audio.time_base else None),
            )
        if video is not None:
            rate = video.average_rate or video.base_rate
            info.update(
                video_codec=video.codec_context.name,
                width=video.codec_context.width,
                height=video.codec_context.height,
                fps=float(rate) if rate else None,
                video_frames=video.frames or None,
            )
    return MediaInfo(**info)
