"""The per-row steps of a batch as plain functions: each runs one stage with the row's paths.

The Prefect flow wraps each step in a task; the `plan` and `align` commands call them
directly. Steps own the bookkeeping between stages (where files go, what is cached in
the row's work folder); the stages themselves live in `tasks/`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import soundfile as sf

from flows.settings import BatchSettings, SettingsError
from model.presets import DISTILLED_INFER_FRAMES, SpeedConfig, preset
from tasks import captions, layout, normalize, plan, speech, stitch, storage
from tasks.calibrate import read_calibration
from tasks.cost import cost_model
from tasks.generate import stage as generate_stage
from tasks.generate.backends import build_generator
from tasks.generate.base import Generator
from tasks.normalize.image import check_image
from tasks.records import (
    MODEL_SAMPLE_RATE,
    ClipResult,
    Cue,
    LoraRef,
    ManifestRow,
    Mode,
    NormalizedAssets,
    Plan,
    RowFailure,
    SegmentJob,
    SegmentResult,
    SpeechAnalysis,
    WordTiming,
)
from tasks.speech import language


def normalize_step(row: ManifestRow, row_dir: Path, settings: BatchSettings) -> NormalizedAssets:
    """Fetch the row's inputs and normalize them; reuse the result while inputs and options are unchanged."""
    key = layout.row_fingerprint(row, {"pad_s": settings.pad_s, "max_audio_s": settings.max_audio_s})

    def compute() -> NormalizedAssets:
        audio, image = fetch_input(row.audio, "audio"), fetch_input(row.image, "image")
        return normalize.normalize_row(row, row_dir, audio_path=audio, image_path=image, pad_s=settings.pad_s,
                                       max_duration_s=settings.max_audio_s)

    return storage.cached_json(
        layout.RowPaths(row_dir).assets_json, key, NormalizedAssets, compute, field="assets",
        valid=lambda assets: Path(assets.audio_16k).exists() and Path(assets.image).exists(),
    )


def image_step(assets: NormalizedAssets, settings: BatchSettings) -> list[str]:
    """The reference image's flags under the batch's image policy; RowFailure('image') under 'fail'.
    Applied to the cached checks, so changing the policy needs no new normalization."""
    return check_image(assets.image_qc, assets.height, settings.image_policy)


_LOADING = threading.Lock()
"""Rows load the speech models one at a time: transformers resolves its lazy imports unsafely when two
threads import at once ("cannot import name 'Wav2Vec2CTCTokenizer'"); once loaded they are cached."""


def speech_step(row: ManifestRow, assets: NormalizedAssets, settings: BatchSettings) -> SpeechAnalysis:
    """Align the script to the audio and check languages; cached beside the normalized audio."""
    model = speech.resolve_alignment_model(settings.alignment_model, settings.checkpoint, row.language)
    key = (f"{assets.audio_qc.model_dump_json()}|{assets.script}|{row.language}|{settings.language_policy}|{model}"
           f"|{settings.mismatch_policy}")
    if settings.whisper_model:
        key += f"|whisper={settings.whisper_model}"
    return storage.cached_json(
        layout.RowPaths.for_assets(assets).speech_json, key, SpeechAnalysis,
        lambda: _analyse_speech(row, assets, settings, model), field="analysis",
    )


def _analyse_speech(
    row: ManifestRow, assets: NormalizedAssets, settings: BatchSettings, model: str | None
) -> SpeechAnalysis:
    # The offline aligner reads the file a block at a time (memory flat in the audio's length), a CTC
    # model a window at a time; Whisper takes the whole recording.
    detected, script, heard = None, assets.script, []
    transcribed = bool(settings.whisper_model) and not (assets.script and assets.script.strip())
    if settings.whisper_model:
        detected, script, heard = _whisper_pass(row, assets, settings)
    if model:
        with _LOADING:
            speech.cached_ctc_model(model, settings.device or "cpu")
    try:
        analysis = speech.align_row(
            assets.audio_16k, script or "", model_folder=model, device=settings.device or "cpu"
        )
    except RowFailure as exc:
        if not transcribed:
            raise
        # The aligner found no path through a transcript (Whisper misheard): keep Whisper's own timings,
        # marked approximate so no cut relies on them.
        analysis = SpeechAnalysis(
            aligner="faster-whisper", approximate=True, words=heard,
            flags=[f"transcript_not_aligned: {exc.reason}; Whisper's word timings kept, cuts approximate"],
        )
    if transcribed:
        analysis.flags.insert(0, f"transcribed: no script; Whisper heard {len(heard)} words: {script[:80]!r}")
    return language.check_language(
        analysis, script=assets.script, expected=row.language, policy=settings.language_policy, detected=detected,
        mismatch_policy=settings.mismatch_policy,
    )


def _whisper_pass(
    row: ManifestRow, assets: NormalizedAssets, settings: BatchSettings
) -> tuple[tuple[str, float], str | None, list[WordTiming]]:
    """Whisper's (language, probability) for the audio and, for a row without a script, its transcript
    and word timings (else the row's script and no words)."""
    from tasks.speech import transcribe  # faster-whisper loads only when a Whisper model is configured

    cuda = (settings.device or "").startswith("cuda")
    with _LOADING:
        whisper = transcribe.load_whisper(
            settings.whisper_model, device="cuda" if cuda else "cpu", compute_type="float16" if cuda else "int8"
        )
    audio, _ = sf.read(assets.audio_16k, dtype="float32")
    detected = transcribe.detect_language(whisper, audio)
    if assets.script and assets.script.strip():
        return detected, assets.script, []
    # A manifest language Whisper has no token for (e.g. 'ga') is left to its detection.
    spoken = row.language if row.language in whisper.supported_languages else detected[0]
    text, words = transcribe.transcribe(whisper, audio, language=spoken)
    return detected, text, words


def plan_step(row: ManifestRow, assets: NormalizedAssets, speech: SpeechAnalysis, settings: BatchSettings) -> Plan:
    """Plan the row's segments; the plan is kept beside its clips so `s2v-batch status` can read it."""
    # Timings from an alignment that did not fit (wrong file, other language) are not trusted
    # for cuts: those rows are cut at the quietest moments instead, and the plan says approximate.
    words = speech.words if speech.words and not speech.approximate else None
    # Only audio that is cut is read (a block at a time), to verify the cuts on it.
    audio = assets.audio_16k if assets.num_samples > settings.max_segment_s * MODEL_SAMPLE_RATE else None
    name, speed = row_speed(row, settings)
    mode = row_mode(row, settings)
    cost = cost_model(settings.gpu_kind, price_per_gpu_hour=settings.gpu_price_per_hour, speed=speed,
                      preset=name, calibration=calibration(settings), mode=mode)  # fmt: skip
    row_plan = plan.plan_row(
        row.id, assets.num_samples, words,
        seed=row.seed, width=assets.width, height=assets.height,
        infer_frames=DISTILLED_INFER_FRAMES if mode == "distilled" else settings.infer_frames,
        max_segment_s=settings.max_segment_s,
        min_segment_s=settings.min_segment_s, resolution=row.resolution, steps=row.steps, guidance=row.guidance,
        cost=cost, audio=audio, speech=speech,
    )
    storage.write_text(str(layout.RowPaths.for_assets(assets).plan_json), row_plan.model_dump_json(indent=1))
    return row_plan


_calibrations: dict[str, dict | None] = {}


def calibration(settings: BatchSettings) -> dict | None:
    """The calibration document the settings name (read once per process); None without one."""
    if not settings.calibration:
        return None
    if settings.calibration not in _calibrations:
        _calibrations[settings.calibration] = read_calibration(settings.calibration)
    return _calibrations[settings.calibration]


def row_speed(row: ManifestRow, settings: BatchSettings) -> tuple[str, SpeedConfig]:
    """The row's preset (its column, else the batch's) with the parts the settings set on top.
    RowFailure naming the setting when it cannot apply (MagCache without a calibration)."""
    name = row.preset or settings.preset
    parts = {
        "steps": settings.sample_steps, "shift": settings.sample_shift, "cfg_steps": settings.cfg_steps,
        "cfg_every": settings.cfg_every, "cache": settings.step_cache, "cache_threshold": settings.cache_threshold,
        "cache_warmup": settings.cache_warmup, "cache_max_skips": settings.cache_max_skips,
    }  # fmt: skip
    try:
        return name, preset(name, calibration(settings), **parts)
    except ValueError as exc:
        raise RowFailure("preset", str(exc)) from None


def row_mode(row: ManifestRow, settings: BatchSettings) -> Mode:
    """The row's mode (its column, else the batch's). For distilled mode, RowFailure naming what of
    the batch's settings it cannot honour (its own cells were checked with the manifest)."""
    mode = row.mode or settings.mode
    if mode != "distilled":
        return mode
    on_model = settings.generator_factory or (settings.backend != "preview" and settings.checkpoint)
    if on_model and not settings.distilled_lora:
        raise RowFailure("mode", "distilled mode needs LiveAvatar's LoRA: set distilled_lora (liveavatar.safetensors)")
    if row.preset is None and settings.preset != "exact":
        raise RowFailure("preset", f"distilled mode samples its own 4 steps; the batch's preset {settings.preset!r} "
                                   "applies to exact mode only (give this row preset 'exact')")  # fmt: skip
    if row.lora is None and settings.lora:
        raise RowFailure("lora", "distilled mode runs with LiveAvatar's LoRA only; give this row lora 'none'")
    if on_model and settings.gpus_per_worker > 1:
        raise RowFailure("mode", f"distilled mode runs on one GPU per worker (its KV cache is not split over GPUs); "
                                 f"this batch has gpus_per_worker={settings.gpus_per_worker}")  # fmt: skip
    return mode


def check_mode_settings(settings: BatchSettings, backend: str) -> None:
    """Fail the batch before any row when distilled mode cannot run as set: SettingsError naming the
    setting (no LoRA, a LoRA that is not LiveAvatar's or not for the checkpoint's transformer, speed
    options). The LoRA is read here, once (seconds); the model backends only, not the preview."""
    if settings.mode == "distilled":
        speed = ("sample_steps", "sample_shift", "cfg_steps", "cfg_every", "step_cache")
        if settings.preset != "exact" or any(getattr(settings, k) is not None for k in speed):
            raise SettingsError(
                "mode 'distilled' samples LiveAvatar's 4 steps: the preset and speed settings (preset, "
                "sample_steps, sample_shift, cfg_*, step_cache) apply to exact mode only"
            )
        if settings.lora:
            raise SettingsError("mode 'distilled' runs with LiveAvatar's LoRA only: setting lora is for exact mode")
    if backend == "preview" or not (settings.distilled_lora or settings.mode == "distilled"):
        return
    if not settings.distilled_lora:
        raise SettingsError("mode 'distilled' needs distilled_lora: the path of LiveAvatar's liveavatar.safetensors")
    from model.checkpoint import transformer_config  # torch: only where the model backend runs
    from model.distilled import check_liveavatar_lora
    from model.layout import CheckpointError, resolve
    from model.lora import LoraError

    try:
        lora = storage.local_copy(settings.distilled_lora)
        local = settings.checkpoint and not storage.is_remote(settings.checkpoint)
        config = transformer_config(resolve(settings.checkpoint).dit) if local else None  # remote: the 14B's
        check_liveavatar_lora(lora, config)
    except (FileNotFoundError, LoraError, CheckpointError) as exc:
        raise SettingsError(f"distilled_lora: {exc}") from None


def row_loras(row: ManifestRow, settings: BatchSettings) -> list[LoraRef]:
    """The row's LoRAs (its columns, else the batch's settings) with one strength each."""
    paths = row.lora if row.lora is not None else settings.lora
    strengths = row.lora_strength if row.lora_strength is not None else settings.lora_strength
    if not paths:
        return []
    strengths = strengths or [1.0]
    if len(strengths) == 1:
        strengths = strengths * len(paths)
    if len(strengths) != len(paths):
        reason = f"{len(strengths)} strengths for {len(paths)} LoRAs: give one, or one per LoRA"
        raise RowFailure("lora_strength", reason)
    return [LoraRef(path=p, strength=s) for p, s in zip(paths, strengths, strict=True)]


def check_speed_settings(settings: BatchSettings) -> None:
    """Fail the batch before any row when its speed or LoRA settings cannot apply: SettingsError naming
    the setting (MagCache without a calibration, a calibration or LoRA file that is not there)."""
    try:
        calibration(settings)
        preset(settings.preset, calibration(settings), cache=settings.step_cache)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    for path in settings.lora:
        if not storage.exists(path):
            raise SettingsError(f"LoRA file not found: {path} (setting lora)")
    if settings.lora_strength and len(settings.lora_strength) not in (1, len(settings.lora)):
        raise SettingsError(f"lora_strength: {len(settings.lora_strength)} strengths for {len(settings.lora)} LoRAs")


def segment_job(
    row: ManifestRow, assets: NormalizedAssets, row_plan: Plan, cues: list[Cue], index: int,
    settings: BatchSettings | None = None,
) -> tuple[SegmentJob, Path]:
    """The job for one planned segment and its folder; cuts the segment's audio into that folder."""
    settings = settings or BatchSettings()
    name, speed = row_speed(row, settings)
    mode = row_mode(row, settings)
    segment = row_plan.segments[index]
    paths = layout.RowPaths.for_assets(assets)
    audio = generate_stage.write_segment_audio(Path(assets.audio_16k), segment, paths.segment_audio(index))
    job = SegmentJob(
        row_id=row.id, segment=segment, image=assets.image, audio=str(audio),
        prompt=row.prompt or "", negative_prompt=row.negative_prompt, pose_video=row.pose_video,
        width=row_plan.width, height=row_plan.height, fps=row_plan.fps, infer_frames=row_plan.infer_frames,
        resolution=row.resolution, steps=row.steps, guidance=row.guidance,
        cues=captions.cues_for_segment(cues, segment), precision=row.precision or settings.precision,
        preset=name, speed=None if speed == SpeedConfig() else speed.to_dict(), loras=row_loras(row, settings),
    )
    if mode == "distilled":  # LiveAvatar's own sampling and LoRA (row_mode refused the rest)
        job = job.model_copy(update={"mode": mode, "distilled_lora": settings.distilled_lora, "loras": []})
    return job, paths.segment_dir(index)


def load_backend(backend: str, settings: BatchSettings) -> Generator:
    """The generator for `backend`: a named one (loaded once per process) or a 'module:callable' factory."""
    return build_generator(backend, settings.checkpoint, settings.device, settings.offload, settings.generator_options,
                           precision=settings.precision)


class HeldTime:
    """Seconds one segment held the flow process's generator, over all its attempts (see `generate_step`).

    A plain class, not a dataclass: Prefect walks dataclass parameters of tasks, and this object
    is shared by a generate task's retries.
    """

    def __init__(self) -> None:
        self.seconds = 0.0


def generate_step(
    row: ManifestRow, assets: NormalizedAssets, row_plan: Plan, cues: list[Cue], index: int,
    backend: str, settings: BatchSettings, on_clip: Callable[[ClipResult], None] | None = None,
    held: HeldTime | None = None,
) -> SegmentResult:
    """Render one planned segment clip by clip in this process, resuming at its first missing clip.

    The caller runs it where it holds the process's generator alone (flows/batch.py); the result's
    `gpu_s` is the time it held it, added up over the attempts that share `held` (records.GPU_SECONDS).
    """
    held = held if held is not None else HeldTime()
    job, seg_dir = segment_job(row, assets, row_plan, cues, index, settings)
    started = time.monotonic()
    try:
        generator = load_backend(backend, settings)
        result = generate_stage.generate_segment(job, generator, seg_dir, on_clip=on_clip)
    finally:
        held.seconds += time.monotonic() - started
    return result.model_copy(update={"gpu_s": round(held.seconds, 3)})


def stitch_step(
    row: ManifestRow, assets: NormalizedAssets, cues: list[Cue], results: list[SegmentResult],
    out: str, settings: BatchSettings, backend: str = "",
) -> dict[str, str]:
    """Join the row's clips, mux the master audio, and publish video and captions to the output folder."""
    paths = layout.RowPaths.for_assets(assets)
    targets = layout.output_uris(out, row)
    caption_files = captions.write_captions(cues, paths.captions_stem) if cues else {}
    clip_paths = [Path(c.path) for r in sorted(results, key=lambda r: r.segment_index) for c in r.clips]
    # The preview animatic already draws its captions; burning them too would show them twice.
    burn = caption_files.get("srt") if settings.burn_captions and backend != "preview" else None
    video = stitch.stitch_row(clip_paths, Path(assets.audio_master), assets.duration_s, paths.video,
                              burn_captions=burn)
    published: dict[str, str] = {}
    for kind, local in caption_files.items():
        storage.put_file(local, targets[kind])
        published[kind] = targets[kind]
    # The video goes last: its presence is what marks the row's outputs complete.
    storage.put_file(video, targets["video"])
    published["video"] = targets["video"]
    return published


def fetch_input(uri: str, column: str) -> Path:
    """A local copy of an input; a vanished or unreadable file is a row failure naming the column."""
    try:
        return storage.local_copy(uri)
    except FileNotFoundError:
        raise RowFailure(column, f"file not found: {uri}") from None
    except PermissionError as exc:
        raise RowFailure(column, f"file not readable: {uri} ({exc})") from None
    except Exception as exc:  # credentials, network, a full cache disk: this row's failure, named
        raise RowFailure(column, storage.describe_access_error(uri, exc, f"column '{column}'")) from None
