"""Normalization stage on real media made here: many audio formats and rates, awkward images, scripts."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from media import (
    _ffmpeg,
    astronaut,
    cmyk_jpeg,
    encode,
    exif_rotated_jpeg,
    gray16_png,
    header_only_wav,
    loudness,
    on_canvas,
    onset_s,
    palette_png,
    quadrants,
    rgba_png,
    speech,
    speechlike,
    video_with_sound,
    with_silence,
    write_wav,
)
from PIL import Image

from tasks.normalize import normalize_audio, normalize_image, normalize_row, normalize_script, size_bucket
from tasks.normalize.image import largest_face
from tasks.records import ManifestRow, Resolution, RowFailure

SPOKEN = "Welcome to the quarterly update. Sales grew in every region this spring."


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About four seconds of espeak-ng speech (22050 Hz mono WAV), made once for the module."""
    return speech(tmp_path_factory.mktemp("speech") / "spoken.wav", SPOKEN)


def _check_pair(audio_16k: Path, master: Path, channels: int, num_samples: int) -> None:
    model_info, master_info = sf.info(str(audio_16k)), sf.info(str(master))
    assert (model_info.samplerate, model_info.channels, model_info.subtype) == (16_000, 1, "PCM_16")
    assert (master_info.samplerate, master_info.channels, master_info.subtype) == (48_000, channels, "PCM_16")
    assert model_info.frames == num_samples
    # Same length within one sample at each rate.
    assert abs(model_info.frames / 16_000 - master_info.frames / 48_000) <= 1 / 16_000
    integrated, true_peak = loudness(master)
    assert abs(integrated - (-16.0)) <= 1.0
    assert true_peak <= -1.0


@pytest.mark.parametrize(
    ("suffix", "rate", "channels", "codec"),
    [
        ("wav", 44_100, 2, "pcm_s16le"),
        ("wav", 8_000, 1, "pcm_s16le"),
        ("mp3", 22_050, 1, "mp3"),
        ("m4a", 44_100, 2, "aac"),
        ("flac", 22_050, 2, "flac"),
        ("ogg", 48_000, 2, "opus"),
    ],
)
def test_audio_formats_rates_and_layouts(
    spoken: Path, tmp_path: Path, suffix: str, rate: int, channels: int, codec: str
) -> None:
    src = encode(spoken, tmp_path / f"in.{suffix}", rate=rate, channels=channels)
    audio_16k, master, qc, n = normalize_audio(src, tmp_path / "row")
    assert (audio_16k.name, master.name) == ("audio_16k.wav", "master.wav")
    _check_pair(audio_16k, master, channels, n)
    assert (qc.source_sample_rate, qc.source_channels, qc.source_codec) == (rate, channels, codec)
    assert qc.duration_s == pytest.approx(n / 16_000)
    assert 2.5 < qc.duration_s <= qc.source_duration_s
    assert -30 < qc.integrated_lufs < -10
    assert qc.master_lufs == pytest.approx(-16.0, abs=1.0)
    assert qc.peak_dbfs <= 0.5 and qc.clipping_ratio < 0.001
    assert not list((tmp_path / "row").glob(".*part*")), "temporary files left behind"


def test_surround_folds_to_stereo_and_video_soundtrack_is_used(spoken: Path, tmp_path: Path) -> None:
    surround = encode(spoken, tmp_path / "surround.flac", rate=48_000, channels=6)
    audio_16k, master, qc, n = normalize_audio(surround, tmp_path / "surround")
    assert (qc.source_channels, qc.source_codec) == (6, "flac")
    _check_pair(audio_16k, master, 2, n)

    clip = video_with_sound(spoken, tmp_path / "clip.mp4")
    audio_16k, master, qc, n = normalize_audio(clip, tmp_path / "clip")
    assert (qc.source_codec, qc.source_channels) == ("aac", 1)
    _check_pair(audio_16k, master, 1, n)

    # A picture that runs on after the sound ends is not a truncated soundtrack.
    longer = tmp_path / "longer.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=12", "-i", str(spoken),
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(longer))  # fmt: skip
    _, _, qc, _ = normalize_audio(longer, tmp_path / "longer")
    assert qc.source_duration_s < 8


def test_joined_damaged_and_late_audio_read_as_the_ffmpeg_binary_reads_them(spoken: Path, tmp_path: Path) -> None:
    # files the ffmpeg binary accepted, the in-process decode accepts too (a review found each failing)
    first, second = encode(spoken, tmp_path / "a.mp3", rate=44_100, channels=2), encode(spoken, tmp_path / "b.mp3")
    joined = tmp_path / "joined.mp3"  # as `cat` joins them: rate and channels change partway
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    damaged = bytearray(encode(spoken, tmp_path / "full.m4a").read_bytes())
    mid = len(damaged) // 2
    damaged[mid : mid + 2000] = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (tmp_path / "damaged.m4a").write_bytes(bytes(damaged))
    late = tmp_path / "late.flv"  # the audio's first packet lies past the small probe
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=1280x720:rate=25", "-itsoffset", "3", "-i", str(spoken), "-t", "5",
            "-c:v", "flv", "-b:v", "20M", "-c:a", "mp3", "-f", "flv", str(late))  # fmt: skip
    _, _, alone, _ = normalize_audio(spoken, tmp_path / "alone")
    _, _, qc, _ = normalize_audio(joined, tmp_path / "joined")
    assert abs(qc.source_duration_s - 2 * alone.source_duration_s) < 0.2  # both parts, not the first alone
    _, _, qc, _ = normalize_audio(tmp_path / "damaged.m4a", tmp_path / "damaged")
    assert abs(qc.source_duration_s - alone.source_duration_s) < 0.3
    _, _, qc, n = normalize_audio(late, tmp_path / "late")
    assert qc.source_codec == "mp3" and n > 0


def test_silence_trimmed_to_pad_with_both_files_in_sync(tmp_path: Path) -> None:
    rate = 22_050
    body = speechlike(3.0, rate, channels=2)
    src = write_wav(tmp_path / "padded.wav", with_silence(body, rate, lead_s=1.5, tail_s=2.0), rate)
    audio_16k, master, qc, n = normalize_audio(src, tmp_path / "row", pad_s=0.25)

    model, _ = sf.read(str(audio_16k), dtype="float32")
    mastered, _ = sf.read(str(master), dtype="float32")
    first_sound = onset_s(body, rate)  # the envelope starts at zero, so sound begins a little in
    # 1.5 s of lead silence, 0.25 s pad kept (to within the 10 ms analysis frame).
    assert qc.trimmed_start_s == pytest.approx(1.5 + first_sound - 0.25, abs=0.011)
    assert onset_s(model, 16_000) == pytest.approx(0.25, abs=0.015)
    assert onset_s(mastered, 48_000) == pytest.approx(onset_s(model, 16_000), abs=0.002)
    assert qc.trimmed_end_s > 1.7
    assert qc.duration_s == pytest.approx(
        qc.source_duration_s - qc.trimmed_start_s - qc.trimmed_end_s, abs=1e-3
    )
    # The tail keeps its pad too: the last 0.2 s are quiet, but sound ends within 0.25 s + a frame of the end.
    tail = np.abs(mastered[-int(0.2 * 48_000) :]).max()
    last_loud = np.flatnonzero(np.abs(mastered).max(axis=1) > 0.01)[-1] / 48_000
    assert tail < 0.01
    assert mastered.shape[0] / 48_000 - last_loud < 0.25 + 0.02
    _check_pair(audio_16k, master, 2, n)


@pytest.mark.parametrize("level", [0.01, 0.99], ids=["quiet", "peaky-loud"])
def test_master_reaches_target_loudness_from_quiet_and_peaky_sources(tmp_path: Path, level: float) -> None:
    rate = 44_100
    src = write_wav(tmp_path / "in.wav", speechlike(6.0, rate, level=level, seed=3), rate)
    audio_16k, master, qc, n = normalize_audio(src, tmp_path / "row")
    _check_pair(audio_16k, master, 1, n)
    source_lufs, _ = loudness(src)
    assert qc.integrated_lufs == pytest.approx(source_lufs, abs=0.3)


def test_peak_and_clipping_recorded(tmp_path: Path) -> None:
    rate = 16_000
    t = np.arange(3 * rate) / rate
    clipped = np.clip(1.6 * np.sin(2 * np.pi * 220 * t), -1.0, 1.0).astype(np.float32)[:, None]
    src = write_wav(tmp_path / "clipped.wav", clipped, rate)
    _, _, qc, _ = normalize_audio(src, tmp_path / "row")
    assert qc.peak_dbfs == pytest.approx(0.0, abs=0.01)
    # |1.6 sin| >= 0.999 for about 56% of a period.
    assert 0.5 < qc.clipping_ratio < 0.62


def _audio_failure(src: Path, tmp_path: Path, **options: float) -> RowFailure:
    with pytest.raises(RowFailure) as caught:
        normalize_audio(src, tmp_path / "row", **options)
    assert caught.value.field == "audio"
    assert not (tmp_path / "row" / "master.wav").exists()
    return caught.value


def test_bad_audio_inputs_fail_with_clear_reasons(tmp_path: Path, spoken: Path) -> None:
    assert "not found" in _audio_failure(tmp_path / "nope.wav", tmp_path).reason

    (tmp_path / "empty.mp3").write_bytes(b"")
    assert "empty" in _audio_failure(tmp_path / "empty.mp3", tmp_path).reason

    (tmp_path / "notes.txt").write_text("Hello, this is a script, not a recording.\n" * 20)
    assert "not an audio file" in _audio_failure(tmp_path / "notes.txt", tmp_path).reason

    astronaut().save(tmp_path / "face.png")
    reason = _audio_failure(tmp_path / "face.png", tmp_path).reason
    assert "not audio" in reason and "image" in reason

    header_only_wav(tmp_path / "zero.wav")
    assert "zero length" in _audio_failure(tmp_path / "zero.wav", tmp_path).reason

    write_wav(tmp_path / "silent.wav", np.zeros((3 * 8000, 1), dtype=np.float32), 8000)
    assert "silent throughout" in _audio_failure(tmp_path / "silent.wav", tmp_path).reason

    # Noise at -70 dBFS is silence for a -50 dBFS threshold.
    hiss = np.random.default_rng(0).normal(0, 10 ** (-70 / 20), (2 * 8000, 1)).astype(np.float32)
    write_wav(tmp_path / "hiss.wav", hiss, 8000)
    assert "silent throughout" in _audio_failure(tmp_path / "hiss.wav", tmp_path).reason

    reason = _audio_failure(spoken, tmp_path, max_duration_s=2.0).reason
    assert "long" in reason and "maximum is 2.0 seconds" in reason


# ---------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("size", "resolution", "expected"),
    [
        # Values from the official rule (wan/speech2video.py get_size_less_than_area).
        ((1024, 1024), Resolution.P480, (576, 576)),
        ((1024, 1024), Resolution.P720, (960, 960)),
        ((1920, 1080), Resolution.P480, (832, 448)),
        ((1920, 1080), Resolution.P720, (1280, 704)),
        ((1080, 1920), Resolution.P480, (448, 832)),
        ((3000, 4000), Resolution.P480, (512, 704)),
        ((3758, 1877), Resolution.P720, (1280, 640)),
        ((2341, 2342), Resolution.P480, (576, 576)),
        # Smaller than the bucket: scaled up (the official code would keep it small).
        ((512, 512), Resolution.P480, (576, 576)),
    ],
)
def test_size_bucket_matches_official_rule(
    size: tuple[int, int], resolution: Resolution, expected: tuple[int, int]
) -> None:
    assert size_bucket(*size, resolution) == expected


@settings(max_examples=200, deadline=None)
@given(
    width=st.integers(256, 6000),
    height=st.integers(256, 6000),
    resolution=st.sampled_from(list(Resolution)),
)
def test_size_bucket_fits_area_grid_and_aspect(width: int, height: int, resolution: Resolution) -> None:
    w, h = size_bucket(width, height, resolution)
    assert w * h <= resolution.max_area
    assert w % 64 == 0 and h % 64 == 0 and w >= 64 and h >= 64
    if 1 / 3 <= width / height <= 3:
        assert abs(math.log((w / h) / (width / height))) < math.log(1.2)
        assert w * h >= 0.6 * resolution.max_area


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img)


def _colour_at(arr: np.ndarray, fx: float, fy: float) -> tuple[int, ...]:
    h, w = arr.shape[:2]
    return tuple(int(v) for v in arr[int(fy * h), int(fx * w)])


def test_exif_rotated_jpeg_is_upright(tmp_path: Path) -> None:
    upright = quadrants((600, 900))  # portrait as the camera saw it
    src = exif_rotated_jpeg(tmp_path / "phone.jpg", upright)
    with Image.open(src) as stored:
        assert stored.size == (900, 600)  # stored on its side
    path, w, h, qc = normalize_image(src, tmp_path / "row", Resolution.P480)
    assert (w, h) == size_bucket(600, 900, Resolution.P480) and h > w
    assert (qc.source_width, qc.source_height) == (600, 900)
    arr = _rgb(path)
    assert arr.shape == (h, w, 3)
    # Red stays top-left and white bottom-right, as in the upright picture.
    assert _colour_at(arr, 0.2, 0.2)[0] > 200 and _colour_at(arr, 0.2, 0.2)[2] < 60
    assert min(_colour_at(arr, 0.8, 0.8)) > 200


@pytest.fixture
def portraits() -> Iterator[OrderedDict]:
    """The process's portrait cache, empty during the test and as it was after it."""
    from tasks.normalize import image

    kept = image._portraits.copy()
    image._portraits.clear()
    yield image._portraits
    image._portraits.clear()
    image._portraits.update(kept)


def test_a_portrait_shared_by_rows_is_normalized_once(tmp_path: Path, portraits: OrderedDict) -> None:
    """Rows whose portraits have the same content (any file name) get the same PNG and checks, from one
    normalization per process; a portrait one pixel apart is its own."""
    pixels = np.asarray(astronaut())
    first, second, other = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    Image.fromarray(pixels).save(first)
    second.write_bytes(first.read_bytes())
    changed = pixels.copy()
    changed[0, 0] = 255 - changed[0, 0]
    Image.fromarray(changed).save(other)
    path_a, *rest_a, qc_a = normalize_image(first, tmp_path / "row0", Resolution.P480)
    [(key, entry)] = portraits.items()
    path_b, *rest_b, qc_b = normalize_image(second, tmp_path / "row1", Resolution.P480)
    assert list(portraits) == [key] and portraits[key] is entry  # the second row reused the first's work
    assert path_a != path_b and path_a.read_bytes() == path_b.read_bytes()
    assert rest_a == rest_b and qc_a == qc_b and qc_a.face_found
    normalize_image(other, tmp_path / "row2", Resolution.P480)
    assert len(portraits) == 2
    normalize_image(first, tmp_path / "row3", Resolution.P720)  # another size: its own work
    assert len(portraits) == 3


def test_the_portrait_used_least_recently_leaves_the_cache_first(
    tmp_path: Path, portraits: OrderedDict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.normalize import image

    monkeypatch.setattr(image, "PORTRAITS_KEPT", 2)
    pixels = np.asarray(astronaut())
    sources = []
    for i in range(3):
        changed = pixels.copy()
        changed[0, 0] = i
        sources.append(tmp_path / f"p{i}.png")
        Image.fromarray(changed).save(sources[-1])
    normalize_image(sources[0], tmp_path / "row0", Resolution.P480)
    [(key_0, entry_0)] = portraits.items()
    normalize_image(sources[1], tmp_path / "row1", Resolution.P480)
    key_1 = list(portraits)[1]
    normalize_image(sources[0], tmp_path / "row2", Resolution.P480)  # the first is used again: kept
    normalize_image(sources[2], tmp_path / "row3", Resolution.P480)
    assert len(portraits) == 2 and key_1 not in portraits and portraits[key_0] is entry_0


def test_cmyk_16bit_palette_and_alpha_images_become_rgb(tmp_path: Path) -> None:
    upright = quadrants((640, 480))
    cases = {
        "cmyk": cmyk_jpeg(tmp_path / "cmyk.jpg", upright),
        "gray16": gray16_png(tmp_path / "gray16.png", (640, 480)),
        "palette": palette_png(tmp_path / "palette.png", upright),
        "rgba": rgba_png(tmp_path / "rgba.png", (640, 480)),
    }
    with Image.open(cases["cmyk"]) as img:
        assert img.mode == "CMYK"
    with Image.open(cases["gray16"]) as img:
        assert img.mode.startswith("I")
    expected_size = size_bucket(640, 480, Resolution.P480)
    out = {}
    for name, src in cases.items():
        path, w, h, _ = normalize_image(src, tmp_path / name, Resolution.P480)
        assert (w, h) == expected_size
        out[name] = _rgb(path)
        assert out[name].shape == (h, w, 3)
    # CMYK and palette keep their colours.
    for name in ("cmyk", "palette"):
        r, g, b = _colour_at(out[name], 0.2, 0.2)
        assert r > 200 and g < 60 and b < 60, name
    # 16-bit ramp is scaled, not clipped: dark on the left, bright on the right, mid-grey between.
    ramp = out["gray16"]
    assert ramp[:, :10].mean() < 40 and ramp[:, -10:].mean() > 215 and 90 < ramp[:, w // 2].mean() < 165
    # Transparent pixels land on white; the opaque square stays red.
    assert min(_colour_at(out["rgba"], 0.05, 0.05)) == 255
    assert _colour_at(out["rgba"], 0.5, 0.5) == (255, 0, 0)


def test_palette_with_transparency_composites_on_white(tmp_path: Path) -> None:
    upright = Image.new("RGB", (400, 400), (0, 0, 0))
    upright.paste((0, 0, 255), (100, 100, 300, 300))
    src = tmp_path / "pal.png"
    palette_png(src, upright, transparent_rgb=(0, 0, 0))
    with Image.open(src) as img:
        assert img.mode == "P" and "transparency" in img.info
    path, _, _, _ = normalize_image(src, tmp_path / "row", Resolution.P480)
    arr = _rgb(path)
    assert min(_colour_at(arr, 0.05, 0.05)) == 255
    assert _colour_at(arr, 0.5, 0.5)[2] > 200 and _colour_at(arr, 0.5, 0.5)[0] < 60


@pytest.mark.parametrize("side", ["left", "right"])
def test_crop_follows_the_face(tmp_path: Path, side: str) -> None:
    # A wide canvas whose 480p bucket (1024×384) leaves 201 px to crop from the resized width (1225):
    # the crop should slide all the way to the side the face is on, where a centre crop takes 100.
    at = (0, 24) if side == "left" else (1786 - 512, 24)
    src = tmp_path / "wide.png"
    on_canvas(astronaut(), (1786, 560), at).save(src)
    path, w, h, qc = normalize_image(src, tmp_path / "row", Resolution.P480)
    assert (w, h) == (1024, 384)
    assert qc.face_found
    assert qc.face_height_ratio is not None and 0.15 < qc.face_height_ratio < 0.6
    left, top, right, bottom = qc.crop_box
    assert (right - left, bottom - top) == (w, h)
    assert left == (0 if side == "left" else 1225 - 1024)
    # The face is in the output, whole.
    face = largest_face(cv2.cvtColor(_rgb(path), cv2.COLOR_RGB2GRAY))
    assert face is not None
    fx, fy, fw, fh = face
    assert fx > 0 and fy >= 0 and fx + fw < w and fy + fh <= h
    assert qc.sharpness > 10


def test_no_face_means_centre_crop(tmp_path: Path) -> None:
    src = tmp_path / "wide.png"
    quadrants((1200, 400)).save(src)
    _, w, h, qc = normalize_image(src, tmp_path / "row", Resolution.P480)
    assert not qc.face_found and qc.face_height_ratio is None
    left, top, right, bottom = qc.crop_box
    resized_w = round(1200 * h / 400)
    assert abs(left - (resized_w - w) / 2) <= 1 and top == 0


def _image_failure(src: Path, tmp_path: Path) -> str:
    with pytest.raises(RowFailure) as caught:
        normalize_image(src, tmp_path / "row", Resolution.P480)
    assert caught.value.field == "image"
    assert not (tmp_path / "row" / "image.png").exists()
    return caught.value.reason


def test_bad_images_fail_with_clear_reasons(tmp_path: Path, spoken: Path) -> None:
    assert "not found" in _image_failure(tmp_path / "missing.jpg", tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty" in _image_failure(tmp_path / "empty.png", tmp_path)
    (tmp_path / "readme.jpg").write_text("not a picture")
    assert "not an image" in _image_failure(tmp_path / "readme.jpg", tmp_path)
    assert "not an image" in _image_failure(spoken, tmp_path)
    quadrants((300, 200)).save(tmp_path / "small.png")
    reason = _image_failure(tmp_path / "small.png", tmp_path)
    assert "300×200" in reason and "at least 256" in reason
    # A truncated JPEG: a real header, then nothing.
    full = tmp_path / "full.jpg"
    quadrants((600, 600)).save(full, quality=90)
    (tmp_path / "cut.jpg").write_bytes(full.read_bytes()[:400])
    assert "damaged" in _image_failure(tmp_path / "cut.jpg", tmp_path)


# ---------------------------------------------------------------- script and row


def test_script_normalization_keeps_words() -> None:
    text = (
        "  \u201cHello,\u201d she said \u2014 it\u2019s\u00a0the 1990\u20132000 range\u2026"
        "\n\n\tThanks\u200b! \ufb01ne "
    )
    assert normalize_script(text) == '"Hello," she said - it\'s the 1990-2000 range... Thanks! fine'
    assert normalize_script("Keep CASE and punctuation: yes; no?") == "Keep CASE and punctuation: yes; no?"
    assert normalize_script("Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ") == "Fullwidth text"
    assert normalize_script("Grüße, señor") == "Grüße, señor"
    assert normalize_script(None) is None
    assert normalize_script(" \n\t ") is None


def test_normalize_row_end_to_end(tmp_path: Path, spoken: Path) -> None:
    image = tmp_path / "portrait.jpg"
    astronaut().save(image, quality=92)
    row = ManifestRow(
        row=1, id="intro", audio=str(spoken), image=str(image), script="It\u2019s  here.", output="intro.mp4"
    )
    assets = normalize_row(row, tmp_path / "intro", audio_path=spoken, image_path=image)
    assert assets.row_id == "intro" and assets.script == "It's here."
    assert (assets.width, assets.height) == size_bucket(512, 512, Resolution.P480) == (576, 576)
    assert Path(assets.image).name == "image.png" and _rgb(Path(assets.image)).shape == (576, 576, 3)
    assert sf.info(assets.audio_16k).frames == assets.num_samples
    assert assets.duration_s == pytest.approx(assets.num_samples / 16_000)
    assert assets.image_qc.face_found
    assert ManifestRow.model_validate(row.model_dump()) == row
    assert type(assets).model_validate_json(assets.model_dump_json()) == assets

    bad = row.model_copy(update={"id": "bad"})
    with pytest.raises(RowFailure) as caught:
        normalize_row(bad, tmp_path / "bad", audio_path=image, image_path=image)
    assert caught.value.field == "audio" and "column 'audio'" in str(caught.value)


def test_stereo_master_keeps_both_channels_and_model_track_is_mono(tmp_path: Path) -> None:
    # Left and right carry different signals: a master made from a mono mix would have equal channels.
    rate = 44_100
    left = speechlike(3.0, rate, seed=1)[:, 0]
    right = speechlike(3.0, rate, seed=2, level=0.15)[:, 0] * np.sin(np.linspace(0, 40, left.size))
    src = write_wav(tmp_path / "stereo.wav", np.stack([left, right], axis=1), rate)
    audio_16k, master, qc, n = normalize_audio(src, tmp_path / "row", pad_s=0.25)
    mastered, master_rate = sf.read(str(master), dtype="float32")
    assert master_rate == 48_000 and mastered.shape[1] == 2
    assert np.abs(mastered[:, 0] - mastered[:, 1]).max() > 0.05
    measured, _ = loudness(master)
    assert measured == pytest.approx(-16.0, abs=1.0) and qc.master_lufs == pytest.approx(measured, abs=0.5)
    _check_pair(audio_16k, master, 2, n)


# ---------------------------------------------------------------- messages that point at the cause (issue 16)


def test_a_tenth_of_a_second_is_too_short(tmp_path: Path) -> None:
    src = write_wav(tmp_path / "blip.wav", speechlike(0.1, 16_000, level=0.5), 16_000)
    reason = _audio_failure(src, tmp_path).reason
    assert reason.startswith("audio is too short: 0.10 seconds")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nan_or_infinite_samples_are_invalid_not_faint(tmp_path: Path, bad: float) -> None:
    samples = speechlike(3.0, 16_000)
    samples[8000:8100] = bad
    src = tmp_path / "broken.wav"
    sf.write(str(src), samples, 16_000, subtype="FLOAT")  # float WAV carries NaN and infinity as they are
    reason = _audio_failure(src, tmp_path).reason
    assert reason.startswith("audio holds invalid samples (NaN or infinite values)")


def test_a_truncated_mp3_is_an_audio_error(spoken: Path, tmp_path: Path) -> None:
    mp3 = encode(spoken, tmp_path / "whole.mp3", rate=44_100, channels=2)
    data = mp3.read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) // 2])  # an interrupted upload: the header still counts every frame
    reason = _audio_failure(cut, tmp_path).reason
    assert reason.startswith("audio file is truncated: it decodes to")
    assert "header announces" in reason


def test_heavy_clipping_is_flagged_and_clean_speech_is_not(spoken: Path, tmp_path: Path) -> None:
    from tasks.normalize.audio import audio_flags

    _, _, clean, _ = normalize_audio(spoken, tmp_path / "clean")
    assert audio_flags(clean) == []
    rate = 16_000
    loud = np.clip(8 * speechlike(4.0, rate, level=0.5), -1.0, 1.0).astype(np.float32)
    _, _, qc, _ = normalize_audio(write_wav(tmp_path / "hot.wav", loud, rate), tmp_path / "hot")
    (flag,) = audio_flags(qc)
    assert flag.startswith("audio_clipped: ") and "% of the samples are at full scale" in flag


def test_a_folder_or_fifo_given_as_audio_is_named_and_never_opened(tmp_path: Path) -> None:
    import os

    (tmp_path / "voices").mkdir()
    assert "not a file" in _audio_failure(tmp_path / "voices", tmp_path).reason
    os.mkfifo(tmp_path / "pipe.wav")  # opening it for reading would wait for a writer
    assert "not a file" in _audio_failure(tmp_path / "pipe.wav", tmp_path).reason


def test_memory_stays_flat_for_long_audio(tmp_path: Path) -> None:
    """Ten minutes of 48 kHz stereo decode to 230 MB of float32; normalization streams it in blocks, so
    the process grows by far less than that (measured in a fresh process: ru_maxrss is a high-water mark)."""
    import subprocess
    import sys

    from media import _ffmpeg

    src = tmp_path / "long.wav"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=220:sample_rate=48000:duration=600", "-af",
            "tremolo=f=4:d=0.9,volume=0.3", "-ac", "2", "-c:a", "pcm_s16le", str(src))
    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from tasks.normalize.audio import normalize_audio\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "qc = normalize_audio(Path(sys.argv[1]), Path(sys.argv[2]))[2]\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(before, after, qc.duration_s)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "row")],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    before_kb, after_kb, duration = done.stdout.split()
    assert float(duration) == pytest.approx(600, abs=1)
    assert int(after_kb) - int(before_kb) < 100 * 1024, done.stdout  # KiB: under 100 MiB of growth
