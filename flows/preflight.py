"""The CPU-only steps before generation, run directly (no Prefect) for `s2v-batch plan` and `align`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import track

from flows import steps, warnings
from flows.settings import BatchSettings
from tasks import layout, speech
from tasks.manifest import validate_manifest
from tasks.normalize.audio import decode_audio
from tasks.records import MODEL_SAMPLE_RATE, Plan, RowFailure, SpeechAnalysis, row_error


def plan_manifest(manifest: str, settings: BatchSettings, *, console: Console) -> tuple[list[Plan], list[str]]:
    """Normalize, align and plan every valid row; returns the plans and one message per failed row.

    Work files go to a cache folder keyed by the manifest, so planning twice (or planning
    then running with the same work folder) normalizes and aligns each row once.
    """
    validation = validate_manifest(manifest, allowed_roots=settings.allowed_roots, mode=settings.mode,
                                   precision=settings.precision)
    problems = [str(issue) for issue in validation.issues]
    work_dir = Path(settings.work_dir) if settings.work_dir else layout.plan_work_dir(manifest)
    plans: list[Plan] = []
    for row in track(validation.rows, description="planning", console=console, transient=True):
        row_dir = layout.RowPaths.for_row(work_dir, row.id).root
        try:
            assets = steps.normalize_step(row, row_dir, settings)
            if (flags := steps.image_step(assets, settings)) and settings.image_policy == "skip":
                problems.append(row_error(row.row, row.id, "column 'image'", "skipped: " + "; ".join(flags)))
                continue
            speech = steps.speech_step(row, assets, settings)
            if skipped := warnings.skip_reasons(speech, settings):  # as `run` would: no GPU time planned
                problems.append(row_error(row.row, row.id, f"skipped by {skipped[1]}", "; ".join(skipped[0])))
                continue
            row_plan = steps.plan_step(row, assets, speech, settings)
            plans.append(row_plan.model_copy(update={"flags": warnings.row_warnings(flags, assets, speech, row_plan)}))
        except RowFailure as exc:
            problems.append(row_error(row.row, row.id, exc.where, exc.reason))
    return plans, problems


def align_file(audio: Path, script: str) -> SpeechAnalysis:
    """Word timings of `script` in `audio`, in seconds from the start of the file as given."""
    samples = decode_audio(audio, MODEL_SAMPLE_RATE)
    return speech.align_words(samples, script, sample_rate=MODEL_SAMPLE_RATE)
