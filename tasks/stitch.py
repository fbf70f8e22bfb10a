"""Stitching: clip videos + loudness-normalized master -> one MP4 per row.

The clips of every segment are concatenated with ffmpeg's concat demuxer. When all
clips share their codec parameters and already hold exactly the frames the audio needs,
the video is stream-copied (no quality loss, seconds for hours of video); otherwise, or
when captions are burned in, it is re-encoded once with the clips' x264 settings. The
master is encoded to AAC, the file gets `+faststart` (moov first, so it streams), and it
is written under a temporary name and renamed when complete. Publishing to a folder or
`s3://` is `tasks.storage.put_file`.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import ImageFont

from tasks.generate.stage import X264_ARGS
from tasks.media import probe, run_ffmpeg
from tasks.records import FPS
from tasks.storage import atomic_local

STITCH_CRF = 17
"""x264 quality when the row has to be re-encoded (near transparent at 480p/720p)."""
AUDIO_BITRATE = "192k"
CAPTION_FONT = "Aileron"
"""Pillow's bundled font; written to a folder libass reads, so burning captions needs no system fonts."""


@dataclass(frozen=True)
class _ClipInfo:
    frames: int
    params: tuple
    width: int
    height: int


def _clip_info(path: Path) -> _ClipInfo:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        cc = stream.codec_context
        frames = stream.frames
        if not frames:  # container without a frame count: count packets
            frames = sum(1 for p in container.demux(stream) if p.size)
        rate = stream.average_rate or stream.base_rate
        # What must agree for the concat demuxer to copy streams into one valid track.
        params = (cc.name, cc.width, cc.height, cc.pix_fmt, cc.profile, str(rate), bytes(cc.extradata or b""))
        return _ClipInfo(frames=frames, params=params, width=cc.width, height=cc.height)


def _concat_list(paths: list[Path], frames: list[int], fps: int, dest: Path) -> None:
    # Concat demuxer syntax: single-quoted paths, a quote written as '\''. Each entry states its
    # duration: without it the demuxer guesses a clip's length from its last packet, which for
    # clips of one or two frames (a segment's trimmed tail) puts the next clip at the wrong time.
    lines = ["ffconcat version 1.0"]
    for p, n in zip(paths, frames, strict=True):
        quoted = str(Path(p).resolve()).replace("'", "'\\''")
        lines.append(f"file '{quoted}'")
        lines.append(f"duration {n / fps:.6f}")
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _subtitles_filter(srt: Path, work: Path, width: int, height: int) -> str:
    """A `subtitles` filter reading a copy of `srt` from `work` (ffmpeg runs there).

    Copying to fixed names avoids escaping arbitrary paths inside a filtergraph; the font
    comes from Pillow so the static ffmpeg's libass needs no fontconfig setup.
    """
    (work / "captions.srt").write_bytes(Path(srt).read_bytes())
    fonts = work / "fonts"
    fonts.mkdir()
    (fonts / "caption.ttf").write_bytes(ImageFont.load_default(size=12).font_bytes)
    # libass sizes are in script units of a 288-line canvas; aim for a 42-character line
    # within ~90 % of the width, capped on landscape frames.
    px = min(width / 18, height / 16)
    size = max(6, round(px * 288 / height))
    style = f"FontName={CAPTION_FONT},FontSize={size},Outline=1,Shadow=0,MarginV=12,BorderStyle=1"
    return f"subtitles=filename=captions.srt:fontsdir=fonts:force_style='{style}'"


def stitch_row(
    clip_paths: list[Path],
    master_audio: Path,
    duration_s: float,
    dest: Path,
    *,
    burn_captions: Path | None = None,
    fps: int = FPS,
) -> Path:
    """Concatenate `clip_paths`, mux `master_audio` (first `duration_s` s) as AAC into `dest`.

    The video gets exactly ceil(duration_s * fps) frames (the last trimmed, or held when
    the clips fall short), so it ends within one frame after the audio.
    """
    if not clip_paths:
        raise ValueError("no clips to stitch")
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    infos = [_clip_info(Path(p)) for p in clip_paths]
    total = sum(i.frames for i in infos)
    needed = math.ceil(duration_s * fps - 1e-6)
    uniform = all(i.params == infos[0].params for i in infos)
    copy = uniform and total == needed and burn_captions is None
    width, height = infos[0].width, infos[0].height

    with tempfile.TemporaryDirectory(prefix="stitch-") as tmpdir, atomic_local(dest) as tmp_out:
        work = Path(tmpdir)
        _concat_list([Path(p) for p in clip_paths], [i.frames for i in infos], fps, work / "clips.ffconcat")
        if copy:
            try:
                _run_ffmpeg(work, master_audio, duration_s, ["-c:v", "copy"], Path(tmp_out), dest)
                _check_output(Path(tmp_out), duration_s, fps)
                return Path(dest)
            except RuntimeError:
                # Copying B-frame streams whose clips hold only a frame or two (a segment's trimmed
                # tail) can leave uneven timestamps; re-encoding once always gives a clean 16 fps.
                pass
        filters = [f"scale={width}:{height}", f"fps={fps}"]
        if total < needed:
            filters.append(f"tpad=stop_mode=clone:stop={needed - total}")
        filters.append(f"trim=end_frame={needed}")
        if burn_captions is not None:
            filters.append(_subtitles_filter(Path(burn_captions), work, width, height))
        encode = ["-vf", ",".join(filters), *X264_ARGS, "-crf", str(STITCH_CRF)]
        _run_ffmpeg(work, master_audio, duration_s, encode, Path(tmp_out), dest)
        _check_output(Path(tmp_out), duration_s, fps)
    return Path(dest)


def _run_ffmpeg(
    work: Path, master_audio: Path, duration_s: float, video_args: list[str], out: Path, dest: Path
) -> None:
    """Concatenate the clips listed in work/clips.ffconcat, mux the master audio, write `out`."""
    args = [
        "-loglevel", "error", "-y",
        # No filter re-initialisation when the clip size changes mid-list: a rebuilt graph
        # would drop the frame the fps filter holds and restart trim's frame count.
        "-reinit_filter", "0", "-f", "concat", "-safe", "0", "-i", "clips.ffconcat",
        "-t", f"{duration_s:.6f}", "-i", str(Path(master_audio).resolve()),
        "-map", "0:v:0", "-map", "1:a:0", *video_args,
        "-c:a", "aac", "-b:a", AUDIO_BITRATE,
        "-movflags", "+faststart", "-f", "mp4", str(out.resolve()),
    ]  # fmt: skip
    run_ffmpeg(args, cwd=work, what=f"stitching {dest}")


def _check_output(path: Path, duration_s: float, fps: int) -> None:
    """Refuse to publish a file that breaks the contract (frame rate, audio, length)."""
    info = probe(path)
    if not info.has_audio or not info.has_video:
        raise RuntimeError(f"stitched file lacks {'audio' if not info.has_audio else 'video'}")
    if info.fps is None or abs(info.fps - fps) > 1e-3:
        raise RuntimeError(f"stitched video runs at {info.fps} fps, expected {fps}")
    video_s = (info.video_frames or 0) / fps
    if abs(video_s - duration_s) > 1 / fps + 1e-3:
        raise RuntimeError(f"stitched video is {video_s:.3f} s, audio {duration_s:.3f} s")
