"""The `batch` Prefect flow: validate a manifest, then run every row through the stages.

Composition only: each task below is a thin wrapper that runs one stage function from
`tasks/` in a worker thread (stages are blocking: ffmpeg, numpy, torch), so rows run
concurrently on the flow's event loop. Without the pool, segments are rendered one at a
time on one thread (`_GENERATOR`): the process holds one model on one device, as a pool
worker does, and a segment's GPU seconds are the time it held it. Each row is its own
subflow run, which keeps the Prefect UI readable for large batches and lets one row fail
without failing the others.
With the GPU pool (flows/pool_run.py) a row's generate tasks wait on the pool, and the row
limit gates only the rows' CPU stages (docs/design-notes.md, "Generation on the pool").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State

from flows import pool_run, progress, steps
from flows.settings import BatchSettings
from tasks import captions, layout, notify, storage
from tasks.generate.backends import resolve_backend
from tasks.manifest import Validation, validate_manifest
from tasks.plan import gpu_money
from tasks.records import (
    DEFAULT_PRECISION,
    ClipResult,
    Cue,
    ManifestRow,
    NormalizedAssets,
    Plan,
    Report,
    RowFailure,
    RowResult,
    SegmentResult,
    SpeechAnalysis,
    row_error,
)
from tasks.speech import language

if TYPE_CHECKING:
    from tasks.generate.pool import GeneratorPool


def _row_failed(row: ManifestRow, where: str, reason: str) -> State:
    """The row subflow's final state when a row fails: Failed in the UI, with a message naming the
    row, the column or stage, and the cause (returned, not raised, so the log holds one line)."""
    progress.emit(row.id, "failed", reason)
    return Failed(message=row_error(row.row, row.id, where, reason))


def _is_transient(task, task_run, state) -> bool:
    """Retry I/O hiccups (network, S3), never a bad row: its error will not go away."""
    exc = state.data  # the task engine hands the raised exception over as the Failed state's data
    return isinstance(exc, OSError | ConnectionError | TimeoutError) and not isinstance(exc, FileNotFoundError)


_GENERATOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s2v-generate")
"""Where the flow process renders its segments, one after another (a queue, not threads waiting on a lock)."""

STAGE = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": _is_transient, "cache_policy": NO_CACHE}


# Tags let operators cap stages across all runs with Prefect's tag concurrency limits, e.g.
# `prefect concurrency-limit create s2v-normalize 4` or `... s2v-generate 8`.
@task(name="normalize", tags=["s2v-normalize"], **STAGE)
async def normalize_task(row: ManifestRow, row_dir: Path, settings: BatchSettings) -> NormalizedAssets:
    return await asyncio.to_thread(steps.normalize_step, row, row_dir, settings)


@task(name="speech", **STAGE)
async def speech_task(row: ManifestRow, assets: NormalizedAssets, settings: BatchSettings) -> SpeechAnalysis:
    return await asyncio.to_thread(steps.speech_step, row, assets, settings)


@task(name="plan", **STAGE)
async def plan_task(
    row: ManifestRow, assets: NormalizedAssets, speech: SpeechAnalysis, settings: BatchSettings
) -> Plan:
    return await asyncio.to_thread(steps.plan_step, row, assets, speech, settings)


@task(name="generate", task_run_name="generate {row.id} segment {index}", tags=["s2v-generate"], **STAGE)
async def generate_task(
    row: ManifestRow, assets: NormalizedAssets, row_plan: Plan, cues: list[Cue], index: int,
    backend: str, settings: BatchSettings, tracker: pool_run.RowProgress | None = None,
    held: steps.HeldTime | None = None,
) -> SegmentResult:
    segment = row_plan.segments[index]
    if (on_pool := pool_run.current()) is not None and tracker is not None:
        # On the pool: this task only waits (retries happen in the pool, per segment).
        job, seg_dir = await asyncio.to_thread(steps.segment_job, row, assets, row_plan, cues, index, settings)
        return await pool_run.run_segment(on_pool.pool, job, seg_dir, tracker)

    def on_clip(clip: ClipResult) -> None:
        progress.emit(row.id, "clip", f"segment {index} clip {clip.index + 1}/{segment.clips}")

    return await asyncio.get_running_loop().run_in_executor(_GENERATOR, functools.partial(
        steps.generate_step, row, assets, row_plan, cues, index, backend, settings, on_clip, held))


@task(name="stitch", **STAGE)
async def stitch_task(
    row: ManifestRow, assets: NormalizedAssets, cues: list[Cue], results: list[SegmentResult],
    out: str, settings: BatchSettings,
) -> dict[str, str]:
    backend = results[0].backend if results else ""
    return await asyncio.to_thread(steps.stitch_step, row, assets, cues, results, out, settings, backend)


@task(name="notify", cache_policy=NO_CACHE)
async def notify_task(url: str, payload: dict, settings: BatchSettings) -> bool:
    """Tell a webhook; never fails the batch (send_webhook retries, then logs and gives up)."""
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    result = await asyncio.to_thread(notify.send_webhook, url, payload, secret=secret)
    return result.ok


class GenerationFailed(Exception):
    """Segments of a row failed on the pool after their attempts; the message has each last error."""


async def _generate_row(
    row: ManifestRow, assets: NormalizedAssets, row_plan: Plan, cues: list[Cue], backend: str,
    settings: BatchSettings,
) -> list[SegmentResult]:
    """All segments of the row at once: in this process, or queued on the batch's GPU pool."""
    indices = range(len(row_plan.segments))
    if pool_run.current() is None:
        # One clock per segment, shared by its task's retries: every attempt counts (records.GPU_SECONDS).
        return list(await asyncio.gather(*(
            generate_task(row, assets, row_plan, cues, i, backend, settings, held=steps.HeldTime()) for i in indices
        )))
    tracker = pool_run.RowProgress(row, row_plan)
    await tracker.start()
    # Segments that finish are kept even when another fails: their clips are reused by a rerun.
    outcomes = await asyncio.gather(*(
        generate_task(row, assets, row_plan, cues, i, backend, settings, tracker) for i in indices
    ), return_exceptions=True)
    await tracker.finish(outcomes)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        for exc in failures:
            if not isinstance(exc, Exception):
                raise exc  # cancellation and the like are not a row's failure
        raise GenerationFailed("; ".join(str(e) for e in failures))
    return list(outcomes)


def _row_skipped(row: ManifestRow, assets: NormalizedAssets, flags: list[str], problems: list[str]) -> RowResult:
    """A row a policy (image or language) skipped: no generation, the problems as its error."""
    progress.emit(row.id, "done", "skipped")
    return RowResult(row=row.row, id=row.id, status="skipped", flags=flags, error="; ".join(problems),
                     audio_qc=assets.audio_qc, image_qc=assets.image_qc)


@flow(name="row", validate_parameters=False)
async def process_row(
    row: ManifestRow, out: str, work_dir: str, backend: str, settings: BatchSettings
) -> RowResult | State:
    """One row from inputs to published video; a failed row ends in a Failed state naming the cause."""
    logger = get_run_logger()
    fingerprint = layout.row_fingerprint(row, _fingerprint_settings(settings, backend))
    if not settings.force and (done := await asyncio.to_thread(layout.load_finished, out, row, fingerprint)):
        logger.info("row %s finished in an earlier run; skipping", row.id)
        progress.emit(row.id, "done", "cached")
        return done

    started = time.monotonic()
    row_dir = layout.RowPaths.for_row(Path(work_dir), row.id).root
    where = "stage 'normalize'"
    try:
        async with pool_run.cpu_gate():
            progress.emit(row.id, "normalize")
            assets = await normalize_task(row, row_dir, settings)
            image_flags = steps.image_step(assets, settings)  # RowFailure('image') under image_policy 'fail'
            if image_flags and settings.image_policy == "skip":
                return _row_skipped(row, assets, image_flags, image_flags)
            where = "stage 'speech'"
            progress.emit(row.id, "speech")
            speech = await speech_task(row, assets, settings)
            if language.should_skip(speech):
                problems = [f for f in speech.flags if f != language.SKIP_FLAG]
                return _row_skipped(row, assets, image_flags + speech.flags, problems)
            where = "stage 'plan'"
            row_plan = await plan_task(row, assets, speech, settings)
            # Timings the aligner itself distrusts are not used: captions then spread evenly (flagged).
            words = speech.words
            if speech.approximate and assets.script:
                words = captions.even_spread_words(assets.script, assets.duration_s)
            cues = captions.cues_from_words(words, until=assets.duration_s)
        where = "stage 'generate'"
        progress.emit(row.id, "generate", f"{row_plan.total_clips} clips")
        results = await _generate_row(row, assets, row_plan, cues, backend, settings)
        where = "stage 'stitch'"
        async with pool_run.cpu_gate():  # stitched as soon as the row's last segment is done
            progress.emit(row.id, "stitch")
            published = await stitch_task(row, assets, cues, list(results), out, settings)
    except RowFailure as exc:
        return _row_failed(row, exc.where, exc.reason)
    except GenerationFailed as exc:
        return _row_failed(row, where, str(exc))
    except Exception as exc:  # a bug or an environment problem: still this row's failure only
        logger.exception("row %s failed unexpectedly at %s", row.id, where)
        return _row_failed(row, where, f"{type(exc).__name__}: {exc}")

    flags = image_flags + list(speech.flags) + [f for f in row_plan.flags if f not in speech.flags]  # + unsafe cuts
    if speech.approximate and assets.script:
        flags.append("captions approximate: spread evenly over the speech, not aligned")
    if not assets.script:
        flags.append("no script: no captions")
    result = RowResult(
        row=row.row, id=row.id, status="succeeded",
        video=_relative(out, published["video"]),
        captions={k: _relative(out, v) for k, v in published.items() if k != "video"},
        duration_s=round(assets.duration_s, 3), backend=backend,
        segments=len(results), clips=sum(len(r.clips) for r in results),
        clips_reused=sum(r.reused_clips for r in results), attempts=max(r.attempts for r in results),
        gpu_s=round(sum(r.gpu_s for r in results), 3), workers=sorted({r.worker for r in results if r.worker}),
        cost=gpu_money(sum(r.gpu_s for r in results), settings.gpu_price_per_hour),
        preset=row.preset or settings.preset, forwards=sum(r.forwards for r in results),
        flags=flags, fit_score=speech.fit_score, words_not_found=[w.word for w in speech.words if not w.found],
        **_step_timings(results),
        audio_qc=assets.audio_qc, image_qc=assets.image_qc,
    )
    await asyncio.to_thread(layout.mark_finished, out, row, fingerprint, result)
    logger.info("row %s done in %.1fs: %s", row.id, time.monotonic() - started, result.video)
    progress.emit(row.id, "done", "succeeded")
    return result


async def _prepare(
    manifest: str, settings: BatchSettings
) -> tuple[str, Validation, GeneratorPool | None, list[dict]]:
    """The backend, the validated manifest, the started GPU pool when rendering on it, and the
    in-process generator's load record otherwise."""
    logger = get_run_logger()
    backend = settings.generator_factory or resolve_backend(settings.backend, settings.checkpoint)
    await asyncio.to_thread(steps.check_speed_settings, settings)
    await asyncio.to_thread(steps.check_mode_settings, settings, backend)
    validation = await asyncio.to_thread(
        validate_manifest, manifest, allowed_roots=settings.allowed_roots, mode=settings.mode,
        precision=settings.precision,
    )
    logger.info("manifest %s: %d rows, %d valid; backend %s%s", manifest, validation.total_rows,
                len(validation.rows), backend, " (labelled animatic, not the model)" if backend == "preview" else "")
    for issue in validation.issues:
        logger.warning("%s", issue)
    if validation.rows and pool_run.use_pool(settings, backend):
        return backend, validation, await pool_run.start_pool(settings, backend), []
    if validation.rows:
        # Load the model before any row starts so a bad checkpoint fails the batch once, early.
        started = time.monotonic()
        generator = await asyncio.to_thread(steps.load_backend, backend, settings)
        load = dict(getattr(generator, "load_timings", None) or {})
        return backend, validation, None, [{"name": "in-process", "load_s": round(time.monotonic() - started, 3),
                                            "load": load}]
    return backend, validation, None, []


@flow(name="batch")
async def batch(manifest: str, out: str, settings: BatchSettings | None = None) -> dict:
    """Run every row of `manifest` and write `out/report.json`; returns the report as a dict.

    Raises ManifestError / BackendError when the batch as a whole cannot run. Row
    failures never fail the batch: they are rows with status 'failed' in the report.
    """
    settings = settings or BatchSettings()
    logger = get_run_logger()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        backend, validation, pool, workers = await _prepare(manifest, settings)
    except Exception as exc:  # the batch cannot run at all: no rows, no report
        if settings.webhook_url:
            await notify_task.with_options(task_run_name="notify batch")(
                settings.webhook_url, notify.batch_error_payload(manifest, out, str(exc)), settings)
        raise
    work_dir = settings.work_dir or str(layout.default_work_dir(out))
    limit = asyncio.Semaphore(settings.max_concurrent_rows)
    # With the pool, `limit` gates the rows' CPU stages only (pool_run.cpu_gate), not whole rows.
    row_limit = limit if pool is None else contextlib.nullcontext()

    async def run_row(row: ManifestRow) -> RowResult:
        async with row_limit:
            state = await process_row.with_options(flow_run_name=f"row {row.row}: {row.id}")(
                row, out, work_dir, backend, settings, return_state=True
            )
            if state.is_completed():
                result = await state.aresult()
            else:
                result = RowResult(row=row.row, id=row.id, status="failed", backend=backend,
                                   error=state.message or row_error(row.row, row.id, "row flow", state.name))
        if row.webhook and not result.cached:
            await notify_task.with_options(task_run_name=f"notify row {row.id}")(
                row.webhook, notify.row_payload(result, out), settings)
        return result

    async with pool_run.serving(pool, limit) if pool is not None else contextlib.nullcontext():
        row_results = list(await asyncio.gather(*(run_row(r) for r in validation.rows)))
    for row_number, issues in validation.issues_by_row().items():
        row_results.append(RowResult(
            row=row_number, id=issues[0].id, status="failed", error="; ".join(str(i) for i in issues)
        ))
    row_results.sort(key=lambda r: r.row)
    if pool is not None:
        workers = [dataclasses.asdict(w) for w in pool.workers]
    gpu_s = round(sum(r.gpu_s or 0.0 for r in row_results if not r.cached), 3)
    report = Report(
        manifest=manifest, output=out, backend=backend, started_at=started_at,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"), rows=row_results,
        gpu=settings.gpu_kind, price_per_gpu_hour=settings.gpu_price_per_hour, gpu_s=gpu_s,
        cost=gpu_money(gpu_s, settings.gpu_price_per_hour), workers=workers,
    )
    await asyncio.to_thread(storage.write_text, layout.report_uri(out), json.dumps(report_json(report), indent=2))
    await acreate_table_artifact(
        key="batch-report",
        table=[_artifact_row(r) for r in report.rows],
        description=f"**{manifest}** → {out} · backend `{backend}` · " + ", ".join(
            f"{n} {k}" for k, n in report.counts.items()
        ),
    )
    logger.info("batch done: %s", report.counts)
    if settings.webhook_url:
        await notify_task.with_options(task_run_name="notify batch")(
            settings.webhook_url, notify.batch_payload(report_json(report)), settings)
    return report_json(report)


def _step_timings(results: list[SegmentResult]) -> dict:
    """The row's median denoising step and the end of its first step, from its new clips."""
    timings = [c.timings for r in results for c in r.clips if c.timings]
    steps = sorted(t["step_s"] for t in timings if "step_s" in t)
    firsts = [t["first_step_at"] for t in timings if "first_step_at" in t]
    return {"step_s": steps[len(steps) // 2] if steps else None, "first_step_at": min(firsts) if firsts else None}


def report_json(report: Report) -> dict:
    data = report.model_dump(mode="json")
    data["counts"] = report.counts
    return data


def _artifact_row(r: RowResult) -> dict:
    return {
        "row": r.row, "id": r.id or "", "status": r.status + (" (cached)" if r.cached else ""),
        "duration_s": r.duration_s if r.duration_s is not None else "",
        "clips": r.clips if r.clips is not None else "", "gpu_s": r.gpu_s if r.gpu_s is not None else "",
        "video": r.video or "", "error": r.error or "", "flags": "; ".join(r.flags),
    }


def _relative(out: str, uri: str) -> str:
    prefix = out.rstrip("/") + "/"
    if storage.is_remote(out):
        return uri[len(prefix):] if uri.startswith(prefix) else uri
    return str(Path(uri).resolve().relative_to(Path(out).resolve()))


def _fingerprint_settings(settings: BatchSettings, backend: str) -> dict:
    """The settings that shape a row's outputs. The optional models count only when set, so rows
    finished before they were fingerprinted keep their markers."""
    keys = ("checkpoint", "pad_s", "max_segment_s", "min_segment_s", "infer_frames", "burn_captions",
            "language_policy")
    optional = {k: getattr(settings, k) for k in ("alignment_model", "whisper_model") if getattr(settings, k)}
    # Likewise only when not the default: a row's precision (validated to be the batch's) and the image policy.
    optional |= {k: getattr(settings, k) for k, default in (("precision", DEFAULT_PRECISION), ("image_policy", "warn"))
                 if getattr(settings, k) != default}
    if settings.generator_factory:
        optional["generator_options"] = settings.generator_options
    if settings.preset != "exact":
        optional["preset"] = settings.preset
    speed = ("sample_steps", "sample_shift", "cfg_steps", "cfg_every", "step_cache", "cache_threshold",
             "cache_warmup", "cache_max_skips", "lora", "lora_strength")  # fmt: skip
    optional |= {k: getattr(settings, k) for k in speed if getattr(settings, k) not in (None, [])}
    if settings.step_cache == "magcache":  # its ratios come from the calibration
        optional["calibration"] = settings.calibration
    if settings.mode != "exact":
        optional["mode"] = settings.mode
    if settings.distilled_lora:
        optional["distilled_lora"] = settings.distilled_lora
    return {"backend": backend, **{k: getattr(settings, k) for k in keys}, **optional}
