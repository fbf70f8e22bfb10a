"""Audio normalization: any common format in, a 16 kHz model track and a loudness-normalized master out.

The source is decoded to float32 in this process (PyAV's filter graphs, `tasks/normalize/measure.py`)
and analysed in numpy block by block as it is decoded (peak, clipping, invalid samples, 10 ms frame
powers for silence), so memory stays a few MB whatever the audio's length. The trim points are chosen
once on that signal; both output files are then written by one ffmpeg run that decodes the source
again (decoding is deterministic) and cuts it at those sample positions, so the 16 kHz track and the
48 kHz master start and end together.

Loudness is EBU R128 in two passes: pass one measures integrated loudness, loudness range and true
peak with libavfilter's `ebur128` filter while decoding; pass two applies the pure gain to -16 LUFS
with `volume` (what `loudnorm` with `linear=true` would do, without its 192 kHz detour; `loudnorm` is
the fallback when a pure gain would overshoot the peak target). Measuring with `ebur128` rather than a first `loudnorm`
run is deliberate: a measuring `loudnorm` pass runs its full dynamic processor at 192 kHz (about 30x
real time for stereo here), while `ebur128` gives the same BS.1770 measurements at about 300x.
Speech whose peaks are too high for a pure gain to stay under -1.5 dBTP first goes through a
lookahead limiter (see `_limit_peaks`), because loudnorm's own fallback misses the target.

A recording that cannot stand for speech fails its row with the cause: too short to measure
(`MIN_DURATION_S`), invalid samples (NaN or infinity), a file that decodes to much less than its
header announces (truncated), silence. Heavy clipping is flagged (`audio_flags`), not failed.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import av
import ffmpeg
import numpy as np

from tasks.media import FFmpegError, MediaInfo, probe, run_ffmpeg
from tasks.normalize.measure import Chain, Loudness, measure
from tasks.records import MODEL_SAMPLE_RATE, AudioQC, RowFailure
from tasks.storage import atomic_local

logger = logging.getLogger(__name__)

MASTER_RATE = 48_000
TARGET_LUFS = -16.0
TARGET_TP = -1.5
DEFAULT_LRA = 11.0
CLIP_LEVEL = 0.999
FRAME_S = 0.010
"""Silence detection works on 10 ms RMS frames: short enough for tight cuts, long enough to ignore clicks."""

MIN_DURATION_S = 0.5
"""Shortest recording accepted: EBU R128 measures loudness over 400 ms blocks, and less than half a second
is no speech to animate."""
CLIPPED_FLAG_RATIO = 0.01
"""Share of samples at full scale from which a recording is flagged as heavily clipped. Clean speech has
none or a few stray samples (under 0.1 %); at 1 % the distortion is audible, and the model animates
the distorted sound."""
TRUNCATED_RATIO = 0.9
"""A file that decodes to less than this share of the duration its header announces (and over 0.5 s
less) is taken as truncated: an interrupted upload or copy."""
BLOCK_FRAMES = 256
"""Analysis frames (10 ms each) per block of the decoded signal: 2.56 s of audio, under 1 MB of float32."""

AUDIO_16K_NAME = "audio_16k.wav"
MASTER_NAME = "master.wav"
# Still-image codecs FFmpeg opens as one-frame "video"; an image given as audio gets named as such.
_IMAGE_CODECS = frozenset({"png", "mjpeg", "jpegls", "webp", "bmp", "gif", "tiff", "jpeg2000", "libjxl", "qoi"})


def _fail(reason: str) -> RowFailure:
    return RowFailure("audio", reason)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} minutes" if seconds >= 90 else f"{seconds:.1f} seconds"


def _ffmpeg_error(err: FFmpegError) -> str:
    """The last meaningful line ffmpeg wrote, for messages and logs."""
    return err.last_line


_SUMMARY_NUMBER = r"(-?(?:\d+(?:\.\d+)?|inf|nan))"


def _parse_ebur128(stderr: str) -> Loudness:
    """Read the summary `ebur128` prints at the end of a run."""
    summary = stderr[stderr.rfind("Summary:") :]

    def grab(pattern: str) -> float:
        match = re.search(pattern, summary, flags=re.S)
        if match is None:
            raise RuntimeError(f"ebur128 summary lacks {pattern!r}")
        return float(match.group(1))

    return Loudness(
        integrated=grab(r"Integrated loudness:\s*I:\s*" + _SUMMARY_NUMBER),
        threshold=grab(r"Integrated loudness:.*?Threshold:\s*" + _SUMMARY_NUMBER),
        lra=grab(r"Loudness range:\s*LRA:\s*" + _SUMMARY_NUMBER),
        true_peak=grab(r"True peak:\s*Peak:\s*" + _SUMMARY_NUMBER),
    )


def _parse_loudnorm(stderr: str) -> dict[str, str]:
    """The JSON block `loudnorm` prints with print_format=json (the last {...} in the log)."""
    start, end = stderr.rfind("{"), stderr.rfind("}")
    if start < 0 or end < start:
        raise RuntimeError("loudnorm printed no measurement")
    return json.loads(stderr[start : end + 1])


def _check_source(src: Path, max_duration_s: float) -> MediaInfo:
    """Probe the file and turn every way it can be unusable into a reason a person can act on."""
    if not src.exists():
        raise _fail(f"audio file not found: {src.name}")
    if not src.is_file():
        raise _fail(f"audio path is not a file: {src.name}")
    try:
        size = src.stat().st_size
        with src.open("rb"):
            pass
    except OSError as exc:
        raise _fail(f"audio file cannot be read ({exc.strerror or exc})") from exc
    if size == 0:
        raise _fail("audio file is empty (0 bytes)")
    try:
        info = probe(src)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise _fail(
            f"{src.name} is not an audio file that can be read (expected WAV, MP3, M4A/AAC, FLAC or OGG)"
        ) from exc
    if not info.has_audio:
        if info.video_codec in _IMAGE_CODECS:
            raise _fail(f"{src.name} is not audio: it looks like an image")
        raise _fail(f"{src.name} is not an audio file: it holds no sound track")
    if info.duration_s is not None and info.duration_s > max_duration_s:
        raise _fail(f"audio is {_minutes(info.duration_s)} long; the maximum is {_minutes(max_duration_s)}")
    return info


@dataclass
class _Analysis:
    """What one streaming pass over the decoded source measured."""

    frames: int = 0
    peak: float = 0.0
    clipped: int = 0
    finite: bool = True
    powers: list[np.ndarray] | None = None
    """Mean power of each 10 ms frame (all channels), one array per block."""
    loudness: Loudness | None = None


def _source_chain(sample_rate: int, channels: int, trim: tuple[int, int] | None = None) -> Chain:
    """The filters that make the source's first audio stream float at `sample_rate` in `channels` (1 or 2),
    optionally cut to the samples [start, end): the same samples in every pass, counted from the first
    decoded one."""
    # Surround and other layouts are folded to stereo before anything is measured.
    chain: Chain = [("aformat", (), {"channel_layouts": "stereo" if channels == 2 else "mono"}),
                    ("aresample", (sample_rate,), {})]  # fmt: skip
    if trim is not None:
        # Timestamps from the sample count, so the cut is at the same samples the analysis counted.
        chain += [("asetpts", ("N/SR/TB",), {}), ("atrim", (), {"start_sample": trim[0], "end_sample": trim[1]}),
                  ("asetpts", ("PTS-STARTPTS",), {})]  # fmt: skip
    return chain


def _source(src: Path, chain: Chain):
    """The source's first audio stream through `chain`, for an ffmpeg run."""
    stream = ffmpeg.input(str(src))["a:0"]
    for name, args, kwargs in chain:
        stream = stream.filter(name, *args, **kwargs)
    return stream


def _analyse(src: Path, sample_rate: int, channels: int) -> _Analysis:
    """Decode the source once, in this process, measuring peak, clipping, invalid samples, 10 ms frame
    powers (numpy, a block at a time) and (`ebur128`, fed by the same decode) its loudness."""
    hop = _hop(sample_rate)
    result = _Analysis(powers=[])
    block = BLOCK_FRAMES * hop
    pending: list[np.ndarray] = []

    def on_block(x: np.ndarray) -> None:
        if not np.isfinite(x).all():
            result.finite = False
            x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
        magnitude = np.abs(x)
        result.peak = max(result.peak, float(magnitude.max()))
        result.clipped += int(np.count_nonzero(magnitude >= CLIP_LEVEL))
        power = np.einsum("ij,ij->i", x, x) / x.shape[1]
        full = power.shape[0] // hop
        frames = power[: full * hop].reshape(full, hop).mean(axis=1)
        if power.shape[0] % hop:  # only the last block ends inside a frame
            frames = np.append(frames, power[full * hop :].mean())
        result.powers.append(frames.astype(np.float32))
        result.frames += x.shape[0]

    def on_samples(x: np.ndarray) -> None:  # the decoder's pieces, regrouped into whole blocks
        pending.append(x)
        if sum(len(p) for p in pending) >= block:
            joined = np.concatenate(pending)
            whole = len(joined) - len(joined) % block
            for a in range(0, whole, block):
                on_block(joined[a : a + block])
            pending[:] = [joined[whole:]] if whole < len(joined) else []

    try:
        loudness = measure(src, _source_chain(sample_rate, channels), channels=channels, on_samples=on_samples)
    except (av.error.FFmpegError, OSError) as exc:
        raise _fail(f"audio could not be decoded ({exc})") from exc
    if pending and (rest := np.concatenate(pending)).size:
        on_block(rest)
    if result.frames and result.finite:
        result.loudness = loudness
    return result


def _hop(sample_rate: int) -> int:
    return max(1, int(round(sample_rate * FRAME_S)))


def _decode(src: Path, sample_rate: int, channels: int) -> np.ndarray:
    """The whole first audio stream as float32 (frames × channels): for `decode_audio` (an `align` of
    one file, the calibration's speech); normalization reads it a block at a time instead (`_analyse`)."""
    blocks: list[np.ndarray] = []
    try:
        measure(src, _source_chain(sample_rate, channels), channels=channels, on_samples=blocks.append)
    except (av.error.FFmpegError, OSError) as exc:
        raise _fail(f"audio could not be decoded ({exc})") from exc
    return np.concatenate(blocks) if blocks else np.zeros((0, channels), dtype=np.float32)


def _trim_points(frames: np.ndarray, n: int, sample_rate: int, pad_s: float, threshold_db: float) -> tuple[int, int]:
    """First and one-past-last sample to keep: sound above the threshold plus `pad_s` either side.

    `frames`: mean power of consecutive 10 ms frames over all channels (`_analyse`), `n` samples in all.
    Returns (0, 0) when no frame is louder than the threshold.
    """
    hop = _hop(sample_rate)
    threshold = 10.0 ** (threshold_db / 10.0)  # power ratio for an RMS level in dBFS
    loud = np.flatnonzero(frames > threshold)
    if loud.size == 0:
        return 0, 0
    pad = int(round(pad_s * sample_rate))
    start = max(0, int(loud[0]) * hop - pad)
    end = min(n, (int(loud[-1]) + 1) * hop + pad)
    return start, end


def _limiter_chain(gain_db: float, sample_rate: int, n: int) -> Chain:
    """The filters that bring the signal up by `gain_db` with its true peaks held under the ceiling, `n`
    samples long."""
    ceiling = 10.0 ** ((TARGET_TP - 0.5) / 20.0)
    return [
        ("volume", (f"{gain_db:.3f}dB",), {}),
        # 2x oversampling catches most inter-sample peaks at half the cost of 4x; the ceiling's
        # 0.5 dB margin and the re-measurement (true peak at 4x) cover the rest.
        ("aresample", (2 * sample_rate,), {}),
        # latency=true removes the lookahead delay, so the signal stays sample-aligned.
        ("alimiter", (), {"limit": ceiling, "level": "false", "latency": "true", "attack": 5, "release": 50}),
        ("aresample", (sample_rate,), {}),
        ("apad", (), {"whole_len": n}),
        ("atrim", (), {"end_sample": n}),
    ]


def _threshold(stream) -> float:
    """The gating threshold `ebur128`'s summary reports for `stream` (an ffmpeg run): only loudnorm's
    fallback needs it, which the in-process measurement does not give."""
    run = stream.filter("ebur128", peak="true", framelog="quiet").output("-", format="null")
    try:
        _, err = run_ffmpeg(run.global_args("-nostats").get_args(), what="measuring loudness")
    except FFmpegError as exc:
        raise RuntimeError(f"loudness measurement failed: {_ffmpeg_error(exc)}") from exc
    return _parse_ebur128(err.decode("utf-8", "replace")).threshold


def _limit_peaks(
    src: Path, sample_rate: int, channels: int, trim: tuple[int, int], loudness: Loudness
) -> tuple[float | None, Loudness]:
    """The limiter gain that tames peaks which would keep `loudnorm` out of linear mode (None: none
    needed), and the loudness of the limited signal.

    Linear normalization needs peak-to-loudness headroom of TARGET_TP - TARGET_LUFS (14.5 dB); close
    speech often has more. loudnorm's own fallback (its dynamic mode) lands 1-2 LU under the target on
    such speech, so instead the signal is brought to the target loudness, its true peaks (approximated at
    2x oversampling) held under the ceiling by ffmpeg's lookahead limiter, and measured again; limiting
    costs a little loudness, so the gain is corrected and the limiter rerun from the source. Each run
    only measures; the output pass applies the chosen gain through the same chain.
    """
    headroom = TARGET_TP - TARGET_LUFS
    if loudness.true_peak - loudness.integrated <= headroom - 0.2:
        return None, loudness
    n = trim[1] - trim[0]
    gain_db = TARGET_LUFS - loudness.integrated
    measured = loudness
    for _ in range(4):
        chain = _source_chain(sample_rate, channels, trim) + _limiter_chain(gain_db, sample_rate, n)
        try:
            measured = measure(src, chain, channels=channels)
        except av.error.FFmpegError as exc:
            raise RuntimeError(f"peak limiting failed: {exc}") from exc
        if measured is None:
            raise RuntimeError("peak limiting failed: nothing was decoded")
        if measured.true_peak - measured.integrated <= headroom - 0.05:
            break
        # Limiting lowered the loudness; raise the gain and redo it. More gain means more limiting, so
        # only about half of each step shows up: step twice the shortfall. Overshooting is harmless
        # (the linear pass turns it down again with the peaks still under the ceiling).
        gain_db += 2.0 * (TARGET_LUFS - measured.integrated) + 0.1
    return gain_db, measured


def _write_outputs(
    src: Path,
    sample_rate: int,
    channels: int,
    trim: tuple[int, int],
    loudness: Loudness,
    audio_16k: Path,
    master: Path,
) -> tuple[int, float | None]:
    """Loudness-normalize the source's samples [start, end) and write both WAVs; returns (16 kHz samples,
    master LUFS)."""
    n_src = trim[1] - trim[0]
    n_master = int(round(n_src * MASTER_RATE / sample_rate))
    n_model = int(round(n_src * MODEL_SAMPLE_RATE / sample_rate))
    limiter_gain, loudness = _limit_peaks(src, sample_rate, channels, trim, loudness)
    gain_db = TARGET_LUFS - loudness.integrated
    # loudnorm's linear mode applies exactly this gain when the peaks stay under TARGET_TP (what
    # _limit_peaks ensures), but always at 192 kHz: about 1.3 s of CPU per 10 minutes of stereo, 4x
    # what `volume` at the source rate costs. loudnorm stays as the fallback for the other case.
    linear = loudness.true_peak + gain_db <= TARGET_TP
    chain = _source_chain(sample_rate, channels, trim)
    if limiter_gain is not None:
        chain += _limiter_chain(limiter_gain, sample_rate, n_src)
    stream = _source(src, chain)
    if linear:
        stream = stream.filter("volume", f"{gain_db:.4f}dB", precision="double")
    else:
        # Let the target range follow the source so speech dynamics are never squeezed: loudnorm only
        # stays linear (a pure gain) when measured LRA <= target LRA.
        lra_target = min(50.0, max(DEFAULT_LRA, math.ceil(loudness.lra + 0.5)))
        stream = stream.filter(
            "loudnorm",
            I=TARGET_LUFS,
            TP=TARGET_TP,
            LRA=lra_target,
            measured_I=loudness.integrated,
            measured_TP=loudness.true_peak,
            # loudnorm reads 0 as "not measured" and would refuse linear mode (steady tones measure 0 LU).
            measured_LRA=max(loudness.lra, 0.1),
            measured_thresh=_threshold(stream) if loudness.threshold is None else loudness.threshold,
            linear="true",
            print_format="json",
        )
    stream = stream.filter("aresample", MASTER_RATE)
    branches = stream.asplit()
    # apad + atrim pin each file to the exact sample count the trimmed source maps to, so resampler
    # delay or flush never lets the two files drift apart by more than one sample.
    master_stream = branches[0].filter("apad", whole_len=n_master).filter("atrim", end_sample=n_master)
    model_stream = (
        branches[1]
        # The downmix inside aresample, not an aformat: an aformat on one branch of asplit forces mono
        # onto the shared input, and the master came out as that downmix duplicated (not stereo, and
        # 2 LU under the target when the channels differ).
        .filter("aresample", MODEL_SAMPLE_RATE, ochl="mono")
        .filter("apad", whole_len=n_model)
        .filter("atrim", end_sample=n_model)
    )
    with atomic_local(audio_16k) as tmp_16k, atomic_local(master) as tmp_master:
        outputs = ffmpeg.merge_outputs(
            ffmpeg.output(master_stream, str(tmp_master), format="wav", acodec="pcm_s16le", ac=channels),
            ffmpeg.output(model_stream, str(tmp_16k), format="wav", acodec="pcm_s16le", ac=1),
            # The master's loudness, measured (the QC reports what was written, not what was aimed at).
            *([ffmpeg.output(branches[2].filter("ebur128", framelog="quiet"), "-", format="null")] if linear else []),
        )
        try:
            _, err = run_ffmpeg(outputs.global_args("-nostats").overwrite_output().get_args(),
                                what="normalizing audio")
        except FFmpegError as exc:
            raise RuntimeError(f"audio normalization failed: {_ffmpeg_error(exc)}") from exc
    if linear:
        summary = err.decode("utf-8", "replace")
        match = re.search(r"Integrated loudness:\s*I:\s*" + _SUMMARY_NUMBER, summary[summary.rfind("Summary:") :])
        return n_model, float(match.group(1)) if match else None
    report = _parse_loudnorm(err.decode("utf-8", "replace"))
    if report.get("normalization_type") != "linear":
        # Not expected after _limit_peaks; loudnorm's dynamic mode still meets the target within ~1-2 LU.
        logger.warning("loudnorm fell back to %s mode: %s", report.get("normalization_type"), report)
    try:
        master_lufs: float | None = float(report["output_i"])
    except (KeyError, ValueError):
        master_lufs = None
    return n_model, master_lufs


def normalize_audio(
    src: Path,
    work_dir: Path,
    *,
    pad_s: float = 0.25,
    max_duration_s: float = 1800,
    silence_threshold_db: float = -50,
) -> tuple[Path, Path, AudioQC, int]:
    """Decode, check, trim and loudness-normalize one audio file.

    Writes `audio_16k.wav` (16 kHz mono s16) and `master.wav` (48 kHz s16, -16 LUFS, stereo when the
    source is) into `work_dir`, cut at the same trimmed instants. Returns (16 kHz path, master path,
    QC, samples in the 16 kHz file). Raises RowFailure('audio', ...) for unusable input.
    """
    # Absolute, so neither ffmpeg nor PyAV can read the name as a protocol ("concat:", "http:") or option.
    src = Path(src).absolute()
    info = _check_source(src, max_duration_s)
    source_rate = int(info.sample_rate or MASTER_RATE)
    source_channels = int(info.channels or 1)
    channels = 2 if source_channels >= 2 else 1
    analysis = _analyse(src, source_rate, channels)
    n = analysis.frames
    if n == 0:
        raise _fail("audio has zero length (the file holds no sound samples)")
    if not analysis.finite:
        raise _fail("audio holds invalid samples (NaN or infinite values): the file is damaged or was "
                    "written by a broken tool; export it again")
    source_duration = n / source_rate
    if source_duration > max_duration_s:
        raise _fail(f"audio is {_minutes(source_duration)} long; the maximum is {_minutes(max_duration_s)}")
    if source_duration < MIN_DURATION_S:
        raise _fail(f"audio is too short: {source_duration:.2f} seconds, at least {MIN_DURATION_S:g} are needed")
    # A file with a picture: only its sound's own duration says whether the sound was cut short.
    announced = info.audio_duration_s if info.has_video else (info.audio_duration_s or info.duration_s)
    if announced and source_duration < TRUNCATED_RATIO * announced and announced - source_duration > 0.5:
        raise _fail(f"audio file is truncated: it decodes to {_minutes(source_duration)} of the "
                    f"{_minutes(announced)} its header announces (an interrupted upload or copy?)")

    start, end = _trim_points(np.concatenate(analysis.powers), n, source_rate, pad_s, silence_threshold_db)
    if end <= start:
        raise _fail(f"audio is silent throughout (nothing louder than {silence_threshold_db:g} dBFS)")
    loudness = analysis.loudness
    if loudness is None or not math.isfinite(loudness.integrated) or loudness.integrated <= -70:
        # Defensive: R128 gates out 400 ms blocks under -70 LUFS, so sound that only just clears the
        # silence threshold in a few 10 ms frames could leave nothing to measure or normalize.
        raise _fail("audio is too faint to measure its loudness (nothing above -70 LUFS)")

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    audio_16k, master = work_dir / AUDIO_16K_NAME, work_dir / MASTER_NAME
    n_model, master_lufs = _write_outputs(src, source_rate, channels, (start, end), loudness, audio_16k, master)

    qc = AudioQC(
        duration_s=n_model / MODEL_SAMPLE_RATE,
        source_duration_s=source_duration,
        source_sample_rate=source_rate,
        source_channels=source_channels,
        source_codec=info.audio_format or info.audio_codec or "unknown",
        integrated_lufs=loudness.integrated,
        peak_dbfs=20.0 * math.log10(analysis.peak) if analysis.peak > 0 else -math.inf,
        clipping_ratio=analysis.clipped / (n * channels),
        trimmed_start_s=start / source_rate,
        trimmed_end_s=(n - end) / source_rate,
        master_lufs=master_lufs,
    )
    return audio_16k, master, qc, n_model


def decode_audio(src: Path, sample_rate: int = MODEL_SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples of a file's first audio stream at `sample_rate`, untrimmed.

    For aligning a file as the user gave it (`s2v-batch align`); raises RowFailure('audio', …)
    for files that are not audio.
    """
    _check_source(Path(src), math.inf)
    return _decode(Path(src), sample_rate, 1)[:, 0]


def audio_flags(qc: AudioQC) -> list[str]:
    """Flags for a recording that normalization accepted but a person should hear: heavy clipping."""
    if qc.clipping_ratio >= CLIPPED_FLAG_RATIO:
        return [f"audio_clipped: {qc.clipping_ratio:.1%} of the samples are at full scale: the recording is "
                "distorted, and the video lip-syncs to the distortion; record again at a lower level"]
    return []
