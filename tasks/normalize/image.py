"""Reference-image normalization: any common still image in, an RGB PNG at the S2V size bucket out.

`normalize_image` records checks of the result (`ImageQC`: face found, its height in the frame,
sharpness); `check_image` turns them into flags and applies the batch's `image_policy`, as the
language check does for speech (tasks/speech/language.py):

* ``warn``: the flags go into the row's report, the row goes on;
* ``skip``: the row is reported as skipped with the flags, nothing is generated;
* ``fail``: RowFailure('image', the flags).

Thresholds (`MIN_FACE_PX`, `MIN_SHARPNESS`) and why they are where they are: see their docstrings.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from tasks.records import ImageQC, Resolution, RowFailure
from tasks.storage import atomic_local

MIN_SHORT_SIDE = 256
SIZE_DIVISOR = 64
"""Wan2.2's S2V size search (`get_size_less_than_area` in wan/speech2video.py) pads both sides to
multiples of 64, whatever its `divisor` argument says; we keep that grid so our sizes are ones the
official pipeline produces."""
IMAGE_NAME = "image.png"
WHITE = (255, 255, 255)
IMAGE_POLICIES = ("warn", "skip", "fail")
MIN_FACE_PX = 96
"""Smallest face (the detector's box, brows to chin) in the output frame, in pixels. The model sees the
frame as 16x16-pixel tokens (VAE 8x, patch 2x2), and the mouth is about a sixth of the face box: below
96 px the lips fall inside one token row and lip motion comes out coarse. At 480p landscape (832x480)
that is 20 % of the frame height; 17 % of a square 576x576 frame; 13 % at 720p (1280x720). The
example portrait (manifests/examples/media/astronaut.jpg, a half-length shot) has a 106 px face at 480p."""
MIN_SHARPNESS = 50.0
"""Smallest variance of the Laplacian of the output crop (8-bit grey). Measured on the example portrait
at 480p (576x576): 528 as is, 222 after a Gaussian blur of 0.5 px at the output scale, 38 after 1 px,
7 after 2 px; the same 512 px photo upscaled to 720p (960x960) gives 101. Below 50 the reference is
blurred by about a pixel or more at the size the model sees it, and a blurry reference gives blurry
lip-sync (the model copies the reference's detail). The variance depends on content too (a plain
background lowers it), which is why the default policy only flags."""


def _fail(reason: str) -> RowFailure:
    return RowFailure("image", reason)


def size_bucket(width: int, height: int, resolution: Resolution) -> tuple[int, int]:
    """Output (width, height) for a `width`×`height` reference at `resolution`.

    Follows Wan2.2's S2V rule so our sizes are the ones the official pipeline produces: walk the
    scale down from sqrt(max_area / area) in 100 even steps and take the first whose sides, rounded
    down and then padded up to multiples of 64, fit within max_area. The walk's lower end is the
    official one, including its use of 2ac where the quadratic formula has 4ac: the lower end sets
    the step size and the step size decides the answer for a few percent of aspect ratios.
    One deliberate difference: the official code never scales an image smaller than max_area up;
    we do, so every row asking for 480p or 720p gets that bucket's size.
    """
    if width <= 0 or height <= 0:
        raise ValueError("image size must be positive")
    area, d = resolution.max_area, SIZE_DIVISOR
    max_scale = math.sqrt(area / (width * height))
    a, b, c = width * height, (d - 1) * (width + height), (d - 1) ** 2 - area
    min_scale = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)
    for step in range(100):
        scale = max_scale - (max_scale - min_scale) * step / 100
        w = math.ceil(int(width * scale) / d) * d
        h = math.ceil(int(height * scale) / d) * d
        if w * h <= area:
            return w, h
    # Unreachable for real images (the walk ends below the scale where full padding fits); kept
    # so an absurd aspect ratio still gets a legal size.
    aspect = width / height
    return max(d, int(math.sqrt(area * aspect)) // d * d), max(d, int(math.sqrt(area / aspect)) // d * d)


def _read(src: Path) -> bytes:
    """The image file's bytes, read once: the portrait cache's key and the decoder see the same content
    (a FIFO or other non-regular path is never opened)."""
    if not src.exists():
        raise _fail(f"image file not found: {src.name}")
    if not src.is_file():
        raise _fail(f"image path is not a file: {src.name}")
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise _fail(f"image file is damaged or cannot be read ({exc})") from exc
    if not data:
        raise _fail("image file is empty (0 bytes)")
    return data


def _decode(data: bytes, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Photos up to PIL's hard limit (~179 MP, beyond 108 MP phone cameras) are fine to work
            # on; the warning PIL gives from ~89 MP would only be noise in the logs.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (UnidentifiedImageError, SyntaxError) as exc:
        raise _fail(f"{name} is not an image that can be read (expected JPEG, PNG or WebP)") from exc
    except Image.DecompressionBombError as exc:
        raise _fail(f"{name} is too large to process safely ({exc})") from exc
    except OSError as exc:
        raise _fail(f"image file is damaged or cannot be read ({exc})") from exc
    return img


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: CMYK, 16-bit and float greys, palette, alpha (composited on white)."""
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "RGBA", "CMYK"):
        # Honour an embedded colour profile (CMYK print files, Adobe RGB photos); PIL's plain
        # conversions ignore it and shift colours.
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
            img = ImageCms.profileToProfile(img, source, _srgb_profile(), outputMode=out_mode)
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile is not worth failing the row; fall back to the plain conversion
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert() clips these to 0..255 instead of scaling; scale by the format's full range.
        arr = np.asarray(img).astype(np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if img.mode == "F":
            full = 1.0 if top <= 1.0 else top
        else:
            full = 65535.0 if img.mode.startswith("I;16") or top > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(arr / full * 255.0), 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


@functools.cache
def _face_detector() -> cv2.CascadeClassifier:
    if not hasattr(cv2, "CascadeClassifier"):
        # OpenCV 5 moved Haar cascades out of the main package (and ships no cascade files).
        raise RuntimeError(f"OpenCV {cv2.__version__} has no Haar cascades; install opencv-python-headless<5")
    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    detector = cv2.CascadeClassifier(path)
    if detector.empty():
        raise RuntimeError(f"OpenCV face cascade missing at {path}")
    return detector


def largest_face(gray: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the largest frontal face in a grayscale image, or None."""
    min_side = max(24, int(min(gray.shape[:2]) * 0.08))
    faces = _face_detector().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: int(f[2]) * int(f[3]))
    return int(x), int(y), int(w), int(h)


def _crop_origin(centre: float, size: int, limit: int) -> int:
    """Top-left coordinate of a `size` window centred on `centre`, kept inside [0, limit]."""
    return int(min(max(round(centre - size / 2), 0), limit - size))


def normalize_image(src: Path, work_dir: Path, resolution: Resolution) -> tuple[Path, int, int, ImageQC]:
    """Orient, convert, resize and face-centre crop the reference image; write `image.png`.

    Returns (path, width, height, QC). Raises RowFailure('image', ...) for unusable input.
    Many rows often share one portrait: the work is done once per process for each distinct content
    and resolution (the file's hash), and the same PNG written for every row.
    """
    src = Path(src)
    data = _read(src)
    key = (hashlib.sha256(data).hexdigest(), resolution)
    with _portraits_lock:  # rows of a flow may normalize in threads
        portrait = _portraits.get(key)
        if portrait is not None:
            _portraits.move_to_end(key)  # the least recently used portrait goes first
    if portrait is None:
        portrait = _portrait(data, src.name, resolution)
        with _portraits_lock:
            _portraits[key] = portrait
            _portraits.move_to_end(key)
            while len(_portraits) > PORTRAITS_KEPT:
                _portraits.popitem(last=False)
    png, out_w, out_h, qc = portrait
    target = Path(work_dir) / IMAGE_NAME
    with atomic_local(target) as tmp:
        tmp.write_bytes(png)
    return target, out_w, out_h, qc.model_copy()


PORTRAITS_KEPT = 16
"""The distinct portraits most recently used whose PNG (about 0.5 MB at 480p) a process keeps for rows
that share them."""
_portraits: OrderedDict[tuple[str, Resolution], tuple[bytes, int, int, ImageQC]] = OrderedDict()
"""Keyed by the SHA-256 of the file's bytes and the resolution; least recently used first."""
_portraits_lock = threading.Lock()


def _portrait(data: bytes, name: str, resolution: Resolution) -> tuple[bytes, int, int, ImageQC]:
    """The normalized portrait of the image file's bytes ``data`` (``name`` for messages) as PNG bytes,
    its size and its checks."""
    img = _decode(data, name)
    # Unreadable EXIF: keep the stored orientation rather than fail the row.
    with contextlib.suppress(OSError, ValueError, SyntaxError):
        img = ImageOps.exif_transpose(img)
    source_w, source_h = img.size
    if min(source_w, source_h) < MIN_SHORT_SIDE:
        raise _fail(f"image is {source_w}×{source_h} px; its short side must be at least {MIN_SHORT_SIDE} px")
    img = to_rgb(img)

    out_w, out_h = size_bucket(source_w, source_h, resolution)
    # Resize so the image covers the bucket on both sides (the short side relative to the bucket's
    # aspect decides), then crop the excess.
    scale = max(out_w / source_w, out_h / source_h)
    resized_w = max(out_w, round(source_w * scale))
    resized_h = max(out_h, round(source_h * scale))
    resized = img.resize((resized_w, resized_h), Image.Resampling.LANCZOS, reducing_gap=3.0)

    rgb = np.asarray(resized)
    face = largest_face(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    if face is not None:
        fx, fy, fw, fh = face
        cx, cy = fx + fw / 2, fy + fh / 2
    else:
        cx, cy = resized_w / 2, resized_h / 2
    left = _crop_origin(cx, out_w, resized_w)
    top = _crop_origin(cy, out_h, resized_h)
    crop = rgb[top : top + out_h, left : left + out_w]

    face_ratio = None
    if face is not None:
        visible = min(fy + fh, top + out_h) - max(fy, top)
        face_ratio = max(0, visible) / out_h
    sharpness = float(cv2.Laplacian(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())

    png = io.BytesIO()
    # A work file read back once per clip: fast compression (level 1: 2/3 of level 3's time, 4 % larger).
    Image.fromarray(np.ascontiguousarray(crop)).save(png, format="PNG", compress_level=1)
    qc = ImageQC(
        source_width=source_w,
        source_height=source_h,
        face_found=face is not None,
        face_height_ratio=face_ratio,
        sharpness=sharpness,
        crop_box=(left, top, left + out_w, top + out_h),
    )
    return png.getvalue(), out_w, out_h, qc


def check_image(qc: ImageQC, frame_height: int, policy: str = "warn") -> list[str]:
    """Flags for a reference image whose checks fail, with the policy applied (see the module docstring).

    `frame_height` is the normalized image's height (the output frame). Returns the flags (empty
    when the image passes); raises RowFailure('image', ...) under policy 'fail' when there are
    any, and ValueError for an unknown policy. Under 'skip' the caller skips a row with flags.
    """
    if policy not in IMAGE_POLICIES:
        raise ValueError(f"image policy must be one of {IMAGE_POLICIES}, got {policy!r}")
    flags = []
    if not qc.face_found:
        flags.append("image_no_face: no frontal face found in the reference; the model animates the face it is "
                     "given, and lip-sync needs one facing the camera")
    elif qc.face_height_ratio is not None and qc.face_height_ratio * frame_height < MIN_FACE_PX:
        px = qc.face_height_ratio * frame_height
        flags.append(f"image_face_small: the face is {px:.0f} px high ({qc.face_height_ratio:.0%} of the "
                     f"{frame_height} px frame), under {MIN_FACE_PX} px lip motion comes out coarse: crop closer "
                     "to the face")
    if qc.sharpness < MIN_SHARPNESS:
        flags.append(f"image_blurry: sharpness {qc.sharpness:.0f} (variance of the Laplacian) is under "
                     f"{MIN_SHARPNESS:.0f}; a blurry reference gives blurry lip-sync: use a sharper or larger photo")
    if flags and policy == "fail":
        raise _fail("; ".join(flags))
    return flags
