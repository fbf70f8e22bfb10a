"""Stitching: frame rate, codecs, length against the audio, faststart, padding/trimming, burned captions."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from tasks.captions import write_captions
from tasks.generate.stage import encode_frames
from tasks.records import Cue
from tasks.stitch import stitch_row

W, H = 64, 112


def _clip(path: Path, frames: int, shade: int, *, size: tuple[int, int] = (W, H), crf: int | None = None) -> Path:
    w, h = size
    video = np.full((frames, h, w, 3), shade, np.uint8)
    video[:, :, : w // 4] = 255 - shade  # a vertical band, so the picture is not flat
    kwargs = {} if crf is None else {"crf": crf}
    encode_frames(video, path, 16, **kwargs)
    return path


def _master(path: Path, seconds: float, rate: int = 48_000) -> Path:
    t = np.arange(int(round(seconds * rate))) / rate
    tone = 0.3 * np.sin(2 * np.pi * 330 * t)
    sf.write(path, np.stack([tone, tone], axis=1).astype(np.float32), rate, subtype="PCM_16")
    return path


def _ffprobe(path: Path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_entries",
         "stream=codec_type,codec_name,pix_fmt,r_frame_rate,nb_read_frames,duration,width,height",
         "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {s["codec_type"]: s for s in json.loads(out.stdout)["streams"]}


def _top_level_boxes(path: Path) -> list[str]:
    """MP4 top-level box types in file order (size/type headers, 64-bit sizes included)."""
    data = path.read_bytes()
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        elif size == 0:
            size = len(data) - pos
        boxes.append(kind)
        pos += size
    return boxes


def _check_contract(path: Path, duration_s: float) -> dict:
    streams = _ffprobe(path)
    v, a = streams["video"], streams["audio"]
    assert (v["codec_name"], v["pix_fmt"], v["r_frame_rate"]) == ("h264", "yuv420p", "16/1")
    assert a["codec_name"] == "aac"
    video_s = int(v["nb_read_frames"]) / 16
    assert abs(video_s - duration_s) <= 1 / 16 + 1e-6
    assert abs(float(a["duration"]) - duration_s) <= 0.03
    boxes = _top_level_boxes(path)
    assert boxes.index("moov") < boxes.index("mdat"), boxes
    return streams


def test_stream_copy_when_clips_match(tmp_path: Path) -> None:
    # 2.53 s of audio needs ceil(40.48) = 41 frames: 16 + 16 + 9.
    clips = [_clip(tmp_path / f"c{k}.mp4", n, 40 + 60 * k) for k, n in enumerate((16, 16, 9))]
    master = _master(tmp_path / "master.wav", 2.53)
    dest = tmp_path / "out" / "row.mp4"
    assert stitch_row(clips, master, 2.53, dest) == dest
    streams = _check_contract(dest, 2.53)
    assert int(streams["video"]["nb_read_frames"]) == 41
    # Stream copy keeps the clips' encoded packets byte for byte (the muxer may repeat the
    # parameter sets in each clip's first keyframe, so those are left out of the comparison).
    with av.open(str(clips[1])) as c:
        clip_packets = [bytes(p) for p in c.demux(video=0) if p.size]
    with av.open(str(dest)) as c:
        out_packets = [bytes(p) for p in c.demux(video=0) if p.size]
    assert len(out_packets) == 41 and out_packets[17:32] == clip_packets[1:]
    assert not list(dest.parent.glob("*.part*"))


@pytest.mark.parametrize("frames", [(16, 8), (16, 16, 16, 16)])
def test_short_video_is_held_and_long_video_trimmed(tmp_path: Path, frames: tuple[int, ...]) -> None:
    clips = [_clip(tmp_path / f"c{k}.mp4", n, 50 * (k + 1)) for k, n in enumerate(frames)]
    master = _master(tmp_path / "master.wav", 2.53)
    dest = stitch_row(clips, master, 2.53, tmp_path / "row.mp4")
    streams = _check_contract(dest, 2.53)
    assert int(streams["video"]["nb_read_frames"]) == 41
    with av.open(str(dest)) as c:
        last = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)][-1]
    # Held: the last frame repeats the last clip's shade; trimmed: frame 40 of clip 2 (shade 150).
    shade = 100 if len(frames) == 2 else 150
    assert abs(int(last[H // 2, -5].mean()) - shade) <= 6


def test_mismatched_clips_are_reencoded(tmp_path: Path) -> None:
    # Different sizes and encoder settings cannot be stream-copied into one track.
    clips = [
        _clip(tmp_path / "a.mp4", 16, 60),
        _clip(tmp_path / "b.mp4", 16, 120, size=(80, 128), crf=30),
    ]
    master = _master(tmp_path / "master.wav", 2.0, rate=16_000)
    dest = stitch_row(clips, master, 2.0, tmp_path / "row.mp4")
    streams = _check_contract(dest, 2.0)
    assert (streams["video"]["width"], streams["video"]["height"]) == (W, H)
    assert int(streams["video"]["nb_read_frames"]) == 32


def test_burned_captions_show_only_while_the_cue_is_on(tmp_path: Path) -> None:
    size = (160, 96)  # landscape, so the caption font is legible at this small size
    clips = [_clip(tmp_path / f"c{k}.mp4", 16, 90, size=size) for k in range(2)]
    master = _master(tmp_path / "master.wav", 2.0)
    srt = write_captions([Cue(start=0.0, end=1.0, text="HELLO WORLD")], tmp_path / "caps")["srt"]
    plain = stitch_row(clips, master, 2.0, tmp_path / "plain.mp4")
    burned = stitch_row(clips, master, 2.0, tmp_path / "burned.mp4", burn_captions=srt)
    _check_contract(burned, 2.0)

    def frames(path: Path) -> np.ndarray:
        with av.open(str(path)) as c:
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(int)

    p, b = frames(plain), frames(burned)
    bottom = slice(size[1] // 2, size[1])
    diff = np.abs(p - b).sum(axis=-1)
    assert (diff[8, bottom] > 60).mean() > 0.005  # text drawn at 0.5 s
    assert (diff[24, bottom] > 60).mean() < 0.002  # gone at 1.5 s


def test_failure_leaves_no_output(tmp_path: Path) -> None:
    clips = [_clip(tmp_path / "a.mp4", 16, 60)]
    dest = tmp_path / "row.mp4"
    with pytest.raises(RuntimeError, match="ffmpeg failed"):
        stitch_row(clips, tmp_path / "missing.wav", 1.0, dest)
    assert not dest.exists() and not list(tmp_path.glob("*.part*"))
    with pytest.raises(ValueError, match="no clips"):
        stitch_row([], tmp_path / "missing.wav", 1.0, dest)


def test_segments_ending_in_one_or_two_frame_clips(tmp_path: Path) -> None:
    # Two segments of 41 and 42 frames at 40 frames a clip: clips of 40, 1, 40 and 2 frames.
    # Stream copy of such tails leaves uneven timestamps; the stitcher must still deliver 16 fps.
    clips = [_clip(tmp_path / f"c{k}.mp4", n, 40 + 50 * k) for k, n in enumerate((40, 1, 40, 2))]
    duration = 83 / 16 - 0.01
    master = _master(tmp_path / "master.wav", duration)
    dest = stitch_row(clips, master, duration, tmp_path / "row.mp4")
    streams = _check_contract(dest, duration)
    assert int(streams["video"]["nb_read_frames"]) == 83
