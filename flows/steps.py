"""The per-row steps of a batch as plain functions: each runs one stage with the row's paths.

The Prefect flow wraps each step in a task; the `plan` and `align` commands call them
directly. Steps own the bookkeeping between stages (where files go, what is cached in
the row's work folder); the stages themselves live in `tasks/`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from flows.settings import BatchSettings
from tasks import captions, layout, normalize, plan, speech, stitch, storage
from tasks.generate import stage as generate_stage
from tasks.generate.backends import load_generator
from tasks.generate.base import Generator
from tasks.records import (
    MODEL_SAMPLE_RATE,
    ClipResult,
    Cue,
    ManifestRow,
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
    cached = row_dir / "assets.json"
    if cached.exists():
        data = json.loads(cached.read_text())
        if data.get("key") == key and all(Path(data["assets"][f]).exists() for f in ("audio_16k", "image")):
            return NormalizedAssets.model_validate(data["assets"])
    audio = fetch_input(row.audio, "audio")
    image = fetch_input(row.image, "image")
    assets = normalize.normalize_row(
        row, row_dir, audio_path=audio, image_path=image, pad_s=settings.pad_s, max_duration_s=settings.max_audio_s
    )
    with storage.atomic_local(cached) as tmp:
        tmp.write_text(json.dumps({"key": key, "assets": assets.model_dump(mode="json")}))
    return assets


def speech_step(row: ManifestRow, assets: NormalizedAssets, settings: BatchSettings) -> SpeechAnalysis:
    """Align the script to the audio and check languages; cached beside the normalized audio."""
    cached = Path(assets.audio_16k).with_name("speech.json")
    model = speech.resolve_alignment_model(settings.alignment_model, settings.checkpoint, row.language)
    key = f"{assets.audio_qc.model_dump_json()}|{assets.script}|{row.language}|{settings.language_policy}|{model}"
    if settings.whisper_model:
        key += f"|whisper={settings.whisper_model}"
    if cached.exists():
        data = json.loads(cached.read_text())
        if data.get("key") == key:
            return SpeechAnalysis.model_validate(data["analysis"])
    audio, rate = sf.read(assets.audio_16k, dtype="float32")
    detected, script, heard = None, assets.script, []
    transcribed = bool(settings.whisper_model) and not (assets.script and assets.script.strip())
    if settings.whisper_model:
        detected, script, heard = _whisper_pass(row, assets, audio, settings)
    try:
        analysis = speech.align_row(
            audio, script or "", sample_rate=rate, model_folder=model, device=settings.device or "cpu"
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
    analysis = language.check_language(
        analysis, script=assets.script, expected=row.language, policy=settings.language_policy, detected=detected
    )
    with storage.atomic_local(cached) as tmp:
        tmp.write_text(json.dumps({"key": key, "analysis": analysis.model_dump(mode="json")}))
    return analysis


def _whisper_pass(
    row: ManifestRow, assets: NormalizedAssets, audio: np.ndarray, settings: BatchSettings
) -> tuple[tuple[str, float], str | None, list[WordTiming]]:
    """Whisper's (language, probability) for the audio and, for a row without a script, its transcript
    and word timings (else the row's script and no words)."""
    from tasks.speech import transcribe  # faster-whisper loads only when a Whisper model is configured

    cuda = (settings.device or "").startswith("cuda")
    whisper = transcribe.load_whisper(
        settings.whisper_model, device="cuda" if cuda else "cpu", compute_type="float16" if cuda else "int8"
    )
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
    audio = None
    if assets.num_samples > settings.max_segment_s * MODEL_SAMPLE_RATE:  # only then is it cut: verify cuts on it
        audio, _ = sf.read(assets.audio_16k, dtype="float32")
    row_plan = plan.plan_row(
        row.id, assets.num_samples, words,
        seed=row.seed, width=assets.width, height=assets.height,
        infer_frames=settings.infer_frames, max_segment_s=settings.max_segment_s,
        min_segment_s=settings.min_segment_s, resolution=row.resolution, steps=row.steps,
        audio=audio, speech=speech,
    )
    with storage.atomic_local(Path(assets.image).with_name("plan.json")) as tmp:
        tmp.write_text(row_plan.model_dump_json(indent=1))
    return row_plan


def segment_job(
    row: ManifestRow, assets: NormalizedAssets, row_plan: Plan, cues: list[Cue], index: int
) -> tuple[SegmentJob, Path]:
    """The job for one planned segment and its folder; cuts the segment's audio into that folder."""
    segment = row_plan.segments[index]
    seg_dir = layout.RowPaths(Path(assets.image).parent).segment_dir(index)
    audio = generate_stage.write_segment_audio(Path(assets.audio_16k), segment, seg_dir / "audio.wav")
    job = SegmentJob(
        row_id=row.id, segment=segment, image=assets.image, audio=str(audio),
        prompt=row.prompt or "", negative_prompt=row.negative_prompt, pose_video=row.pose_video,
        width=row_plan.width, height=row_plan.height, fps=row_plan.fps, infer_frames=row_plan.infer_frames,
        resolution=row.resolution, steps=row.steps, guidance=row.guidance,
        cues=captions.cues_for_segment(cues, segment),
    )
    return job, seg_dir


def load_backend(backend: str, settings: BatchSettings) -> Generator:
    """The generator for `backend`: a named one (loaded once per process) or a 'module:callable' factory."""
    if ":" in backend:
        from tasks.generate.pool import build_generator

        return build_generator(backend, settings.checkpoint, settings.device, settings.offload,
                               settings.generator_options)
    return load_generator(backend, settings.checkpoint, device=settings.device, offload=settings.offload)


def generate_step(
    row: ManifestRow, assets: NormalizedAssets, row_plan: Plan, cues: list[Cue], index: int,
    backend: str, settings: BatchSettings, on_clip: Callable[[ClipResult], None] | None = None,
) -> SegmentResult:
    """Render one planned segment clip by clip in this process, resuming at its first missing clip."""
    job, seg_dir = segment_job(row, assets, row_plan, cues, index)
    generator = load_backend(backend, settings)
    return generate_stage.generate_segment(job, generator, seg_dir, on_clip=on_clip)


def stitch_step(
    row: ManifestRow, assets: NormalizedAssets, cues: list[Cue], results: list[SegmentResult],
    out: str, settings: BatchSettings, backend: str = "",
) -> dict[str, str]:
    """Join the row's clips, mux the master audio, and publish video and captions to the output folder."""
    paths = layout.RowPaths(Path(assets.image).parent)
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
