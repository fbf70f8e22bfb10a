"""The `preview` backend: an honest animatic, not a model, rendered on the CPU.

It shows what a GPU run would be built from, at the planned size, frame rate and clip
layout: the normalized reference image (with a slow Ken Burns zoom so motion and timing
are visible), a large `PREVIEW` label, the row id, the caption cue active at each frame,
an audio level meter, a timeline with a tick at each planned clip boundary, and at the
first frames of every clip a flash bar and a "CLIP n/N" marker. A batch can so be
checked for framing, timing and captions before GPU time is spent.

Clips are whole `infer_frames` clips, as the model yields them; the stage trims the last
one to the segment's planned frames. Frame `t` depends only on the job and `t`, so a
resumed segment renders exactly what an uninterrupted one would.

Speed: text is rasterized once per distinct string (PIL, Pillow's bundled font) and
alpha-blended into small regions; the only full-frame work per frame is the zoom warp.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFont, ImageOps

from tasks.generate.base import GeneratedClip
from tasks.records import SegmentJob

FLASH_FRAMES = 4
"""Frames at the start of each clip that carry the flash bar (a quarter second at 16 fps)."""
MARKER_FRAMES = 12
"""Frames at the start of each clip that show the large CLIP n/N text."""
ZOOM = 0.06
"""Ken Burns zoom reached at the end of the segment (6 %)."""
ZOOM_STEP = 4
"""Frames that share one zoom level: a step is a fraction of a pixel, and warping with
bilinear filtering is the costliest per-frame work, so it runs once per step."""


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(6, size))


@dataclass
class _Patch:
    """Premultiplied RGB and alpha of a small overlay, placed at (y, x)."""

    y: int
    x: int
    rgb: np.ndarray  # uint16 (h, w, 3), already multiplied by alpha / 255
    inv_alpha: np.ndarray  # uint16 (h, w, 1), 255 - alpha

    def blend(self, frame: np.ndarray) -> None:
        h, w = self.inv_alpha.shape[:2]
        y0, x0 = max(self.y, 0), max(self.x, 0)
        y1, x1 = min(self.y + h, frame.shape[0]), min(self.x + w, frame.shape[1])
        if y1 <= y0 or x1 <= x0:
            return
        sy, sx = y0 - self.y, x0 - self.x
        region = frame[y0:y1, x0:x1]
        inv = self.inv_alpha[sy : sy + y1 - y0, sx : sx + x1 - x0]
        fg = self.rgb[sy : sy + y1 - y0, sx : sx + x1 - x0]
        region[...] = ((region.astype(np.uint16) * inv + 127) // 255 + fg).astype(np.uint8)


def _patch_from_rgba(img: Image.Image, y: int, x: int) -> _Patch:
    a = np.asarray(img, dtype=np.uint16)
    alpha = a[..., 3:4]
    return _Patch(y=y, x=x, rgb=(a[..., :3] * alpha + 127) // 255, inv_alpha=255 - alpha)


def _text_box(
    lines: list[str],
    size: int,
    *,
    max_width: int,
    fill: tuple[int, int, int] = (255, 255, 255),
    box_alpha: int = 150,
) -> Image.Image:
    """Centered lines on a translucent dark box, the font shrunk until the box fits."""
    while True:
        font = _font(size)
        probe = ImageDraw.Draw(Image.new("L", (1, 1)))
        boxes = [probe.textbbox((0, 0), line, font=font) for line in lines]
        widths = [b[2] - b[0] for b in boxes]
        if max(widths, default=0) + size <= max_width or size <= 6:
            break
        size = max(6, int(size * 0.9))
    pad = max(2, size // 4)
    line_h = int(size * 1.2)
    w = min(max_width, max(widths, default=0) + 2 * pad)
    h = line_h * len(lines) + 2 * pad
    img = Image.new("RGBA", (w, h), (0, 0, 0, box_alpha))
    draw = ImageDraw.Draw(img)
    for k, (line, box) in enumerate(zip(lines, boxes, strict=True)):
        x = (w - (box[2] - box[0])) // 2 - box[0]
        draw.text((x, pad + k * line_h), line, font=font, fill=(*fill, 255))
    return img


class _Renderer:
    """Everything that is fixed for one job, computed once; `frame(t)` draws frame t."""

    def __init__(self, job: SegmentJob, zoom: float):
        self.job = job
        self.h, self.w = job.height, job.width
        self.per_clip = job.infer_frames
        self.clips = job.segment.clips
        self.total = self.clips * self.per_clip
        self.zoom = zoom
        with Image.open(job.image) as im:
            ref = ImageOps.fit(im.convert("RGB"), (self.w, self.h), method=Image.Resampling.LANCZOS)
        self.base = np.asarray(ref, dtype=np.uint8).copy()
        short = min(self.w, self.h)
        margin = max(2, short // 40)
        self.margin = margin
        self.bar_h = max(2, self.h // 60)

        # Overlays keep to the edges: the middle of a portrait is the face being checked.
        # Top strip: PREVIEW at the left, row id and segment at the right.
        y = self.bar_h + margin
        label = _text_box(["PREVIEW"], short // 9, max_width=self.w // 2, fill=(255, 70, 70))
        self.static = [_patch_from_rgba(label, y, margin + self.bar_h)]
        info = _text_box(
            [f"id {job.row_id}", f"segment {job.segment.index}", "not a model"],
            short // 30,
            max_width=self.w - label.width - 3 * margin - 2 * self.bar_h,
        )
        self.static.append(_patch_from_rgba(info, y, self.w - margin - self.bar_h - info.width))
        self.marker_y = y + max(label.height, info.height) + margin

        # Timeline along the bottom edge, with a tick at every planned clip boundary.
        self.timeline_h = max(3, self.h // 80)
        self.timeline_y = self.h - self.timeline_h
        self.ticks = [round(k * self.per_clip * (self.w - 1) / self.total) for k in range(1, self.clips)]
        self.status_size = max(6, short // 28)
        self.status_y = self.timeline_y - int(self.status_size * 1.2) - 2 * max(2, self.status_size // 4)
        self.caption_bottom = self.status_y - margin
        self.levels = self._audio_levels(job)
        self._zoomed: tuple[int, np.ndarray] | None = None
        self._caption_cache: dict[int, _Patch] = {}
        self._marker_cache: dict[int, _Patch] = {}

    def _audio_levels(self, job: SegmentJob) -> np.ndarray:
        """RMS level per video frame in [0, 1] (-60 dBFS .. 0 dBFS)."""
        audio, rate = sf.read(job.audio, dtype="float32", always_2d=True)
        mono = audio.mean(axis=1)
        hop = rate / job.fps
        n = self.total
        idx = (np.arange(n + 1) * hop).astype(np.int64).clip(0, len(mono))
        sq = np.concatenate([[0.0], np.cumsum(mono.astype(np.float64) ** 2)])
        counts = np.maximum(idx[1:] - idx[:-1], 1)
        rms = np.sqrt((sq[idx[1:]] - sq[idx[:-1]]) / counts)
        db = 20 * np.log10(np.maximum(rms, 1e-6))
        return np.clip((db + 60) / 60, 0, 1)

    def _caption(self, k: int) -> _Patch:
        if k not in self._caption_cache:
            lines = self.job.cues[k].text.splitlines() or [""]
            img = _text_box(lines, min(self.w, self.h) // 16, max_width=self.w - 2 * self.margin)
            self._caption_cache[k] = _patch_from_rgba(img, self.caption_bottom - img.height, (self.w - img.width) // 2)
        return self._caption_cache[k]

    def _marker(self, clip: int) -> _Patch:
        if clip not in self._marker_cache:
            img = _text_box(
                [f"CLIP {clip + 1}/{self.clips}"],
                min(self.w, self.h) // 12,
                max_width=self.w // 2,
                fill=(255, 220, 0),
                box_alpha=190,
            )
            x = self.w - self.margin - self.bar_h - img.width  # right edge, clear of a centred face
            self._marker_cache[clip] = _patch_from_rgba(img, self.marker_y, x)
        return self._marker_cache[clip]

    def _status(self, t: int, clip: int) -> _Patch:
        secs = t / self.job.fps
        text = f"clip {clip + 1}/{self.clips}  f{t:05d}  {int(secs // 60):02d}:{secs % 60:05.2f}"
        img = _text_box([text], self.status_size, max_width=self.w // 2 + self.w // 4, box_alpha=170)
        return _patch_from_rgba(img, self.status_y, self.margin)

    def _background(self, t: int) -> np.ndarray:
        step = t // ZOOM_STEP
        if self._zoomed is None or self._zoomed[0] != step:
            s = 1.0 + self.zoom * step * ZOOM_STEP / max(self.total - 1, 1)
            cx, cy = (self.w - 1) / 2, (self.h - 1) / 2
            m = np.array([[s, 0, (1 - s) * cx], [0, s, (1 - s) * cy]], dtype=np.float64)
            warped = cv2.warpAffine(
                self.base, m, (self.w, self.h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
            )
            self._zoomed = (step, warped)
        return self._zoomed[1]

    def frame(self, t: int, out: np.ndarray) -> None:
        """Draw frame `t` (0 = the segment's first frame) into `out` (H, W, 3) uint8."""
        np.copyto(out, self._background(t))
        for p in self.static:
            p.blend(out)
        clip, in_clip = divmod(t, self.per_clip)
        secs = t / self.job.fps
        for k, cue in enumerate(self.job.cues):
            if cue.start <= secs < cue.end:
                self._caption(k).blend(out)
                break
        if in_clip < FLASH_FRAMES:
            out[: self.bar_h] = (255, 220, 0)
            out[:, : self.bar_h] = (255, 220, 0)
            out[:, -self.bar_h :] = (255, 220, 0)
        if in_clip < MARKER_FRAMES:
            self._marker(clip).blend(out)
        self._status(t, clip).blend(out)
        # Audio meter right of the status line.
        meter_x0 = self.w // 2 + self.w // 4 + 2 * self.margin
        meter_w = self.w - self.margin - meter_x0
        if meter_w > 2:
            y0, y1 = self.status_y + 2, self.timeline_y - 2
            out[y0:y1, meter_x0 : meter_x0 + meter_w] = (30, 30, 30)
            lit = int(round(self.levels[t] * meter_w)) if t < len(self.levels) else 0
            out[y0:y1, meter_x0 : meter_x0 + lit] = (60, 220, 90)
        # Timeline: played part, rest, clip ticks.
        done = int(round(t * (self.w - 1) / max(self.total - 1, 1)))
        tl = out[self.timeline_y :]
        tl[:] = (60, 60, 60)
        tl[:, : done + 1] = (255, 255, 255)
        for x in self.ticks:
            tl[:, max(0, x - 1) : x + 1] = (255, 220, 0)


class PreviewGenerator:
    """CPU animatic backend; see the module docstring."""

    name = "preview"
    VERSION = 2
    """Bump when the rendering changes, so cached preview clips are redrawn."""

    def __init__(self, *, zoom: float = ZOOM):
        self.zoom = zoom

    @property
    def fingerprint(self) -> str:
        """What besides the job decides the pixels (read by the stage to spot stale clips)."""
        return f"preview-v{self.VERSION} zoom={self.zoom}"

    def clips(
        self,
        job: SegmentJob,
        start_clip: int = 0,
        state: dict[str, np.ndarray] | None = None,
    ) -> Iterator[GeneratedClip]:
        """Yield clips `start_clip ..` of `job`; the state is the next frame's index.

        The preview needs no state to continue (frames are a function of their index), but
        it yields and checks one so the stage's resume path is exercised on CPU as well.
        """
        if start_clip > 0 and state and "next_frame" in state:
            got = int(np.asarray(state["next_frame"]).reshape(-1)[0])
            if got != start_clip * job.infer_frames:
                raise ValueError(f"state says frame {got}, clip {start_clip} starts at {start_clip * job.infer_frames}")
        renderer = _Renderer(job, self.zoom)
        n = job.infer_frames
        for k in range(start_clip, job.segment.clips):
            frames = np.empty((n, job.height, job.width, 3), dtype=np.uint8)
            for i in range(n):
                renderer.frame(k * n + i, frames[i])
            yield GeneratedClip(index=k, frames=frames, state={"next_frame": np.array([(k + 1) * n], dtype=np.int64)})
