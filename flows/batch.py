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
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import State

from flows import pool_run, progress, report, states, steps, warnings
from flows.report import report_json
from flows.settings import BatchSettings
from tasks import captions, layout, notify, output_place, runlock, storage
from tasks.cost import gpu_money
from tasks.generate.backends import resolve_backend
from tasks.manifest import Validation, validate_manifest
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

if TYPE_CHECKING:
    from tasks.generate.pool import GeneratorPool


def _row_failed(row: ManifestRow, where: str, reason: str) -> State:
    """The row subflow's final state when a row fails: Failed in the UI, with a message naming the
    row, the column or stage, and the cause (returned, not raised, so the log holds one line)."""
    progress.emit(row.id, "failed", reason)
    return states.row_failed(row_error(row.row, row.id, where, reason))


def _is_transient(task, task_run, state) -> bool:
    """Retry I/O hiccups (network, S3), never a bad row: its error will not go away."""
    exc = state.data  # the task engine hands the raised exception over as the Failed state's data
    if output_place.disk_cause(exc):  # a full or read-only disk stays so for the seconds a retry waits
        return False
    return isinstance(exc, OSError | ConnectionError | TimeoutError) and not isinstance(exc, FileNotFoundError)


_GENERATOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s2v-generate")
"""Where the flow process renders its segments, one after another (a queue, not threads waiting on a lock)."""

STAGE = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": _is_transient, "cache_policy": NO_CACHE}


# Tags let operators cap stages across all runs with Prefect's tag concurrency limits, e.g.
# `prefect concurrency-limit create s2v-normalize 4` or `... s2v-generate 8`.
@task(name="normalize", task_run_name="normalize {row.id}", tags=["s2v-normalize"], **STAGE)
async def normalize_task(row: ManifestRow, row_dir: Path, settings: BatchSettings) -> NormalizedAssets:
    return await asyncio.to_thread(steps.normalize_step, row, row_dir, settings)


@task(name="speech", task_run_name="speech {row.id}", **STAGE)
async def speech_task(row: ManifestRow, assets: NormalizedAssets, settings: BatchSettings) -> SpeechAnalysis:
    return await asyncio.to_thread(steps.speech_step, row, assets, settings)


@task(name="plan", task_run_name="plan {row.id}", **STAGE)
async def plan_task(
    row: ManifestRow, assets: NormalizedAssets, speech: SpeechAnalysis, settings: BatchSettings
) -> Plan:
    return await asyncio.to_thread(steps.plan_step, row, assets, speech, settings)


@task(name="generate", task_run_name="generate {row.id} segment {index}", tags=["s2v-generate"], **STAGE)
async def generate_task(
    row: ManifestRow, assets: NormalizedAssets, row_plan: Plan, cues: list[Cue], index: int,
    backend: str, settings: BatchSettings, tracker: pool_run.RowProgress, held: steps.HeldTime | None = None,
) -> SegmentResult:
    segment = row_plan.segments[index]
    if (on_pool := pool_run.current()) is not None:
        # On the pool: this task only waits (retries happen in the pool, per segment).
        job, seg_dir = await asyncio.to_thread(steps.segment_job, row, assets, row_plan, cues, index, settings)
        return await pool_run.run_segment(on_pool.pool, job, seg_dir, tracker)
    loop = asyncio.get_running_loop()

    def on_clip(clip: ClipResult) -> None:  # in the generator's thread: the artifact is updated on the loop
        asyncio.run_coroutine_threadsafe(tracker.clip(index, clip.index + 1, segment.clips, clip.reused), loop)

    return await loop.run_in_executor(_GENERATOR, functools.partial(
        steps.generate_step, row, assets, row_plan, cues, index, backend, settings, on_clip, held))


@task(name="stitch", task_run_name="stitch {row.id}", **STAGE)
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
    settings: BatchSettings, batch_key: str,
) -> list[SegmentResult]:
    """All segments of the row at once: in this process, or queued on the batch's GPU pool."""
    indices = range(len(row_plan.segments))
    tracker = pool_run.RowProgress(row, row_plan, batch_key)
    await tracker.start()
    if pool_run.current() is None:
        # One clock per segment, shared by its task's retries: every attempt counts (records.GPU_SECONDS).
        results = list(await asyncio.gather(*(
            generate_task(row, assets, row_plan, cues, i, backend, settings, tracker, held=steps.HeldTime())
            for i in indices
        )))
        await tracker.finish(results)
        return results
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


def _row_skipped(
    row: ManifestRow, assets: NormalizedAssets, flags: list[str], reasons: list[str], policy: str
) -> State:
    """A row a policy (image, language, mismatch) skipped: no generation; its error names the reasons and
    the policy (all the evidence is in its flags)."""
    progress.emit(row.id, "done", "skipped")
    error = row_error(row.row, row.id, f"skipped by {policy}", "; ".join(reasons))
    get_run_logger().warning("%s", error)
    return states.row_state(RowResult(row=row.row, id=row.id, status="skipped", flags=flags, error=error,
                                      audio_qc=assets.audio_qc, image_qc=assets.image_qc))


@flow(name="row", validate_parameters=False)
async def process_row(
    row: ManifestRow, out: str, work_dir: str, backend: str, settings: BatchSettings, batch_key: str = "s2v"
) -> State:
    """One row from inputs to published video; ends Completed, Flagged, Skipped or Cached with the RowResult,
    or Failed naming the cause (flows/states.py)."""
    logger = get_run_logger()
    fingerprint = layout.row_fingerprint(row, _fingerprint_settings(settings, backend))
    if not settings.force and (done := await asyncio.to_thread(layout.load_finished, out, row, fingerprint)):
        logger.info("row %s finished in an earlier run; skipping", row.id)
        progress.emit(row.id, "done", "cached")
        return states.row_state(done)

    started = time.monotonic()
    row_dir = layout.RowPaths.for_row(Path(work_dir), row.id).root
    where = "stage 'normalize'"
    try:
        async with pool_run.cpu_gate():
            progress.emit(row.id, "normalize")
            assets = await normalize_task(row, row_dir, settings)
            image_flags = steps.image_step(assets, settings)  # RowFailure('image') under image_policy 'fail'
            if image_flags and settings.image_policy == "skip":
                return _row_skipped(row, assets, image_flags, image_flags, "image_policy 'skip'")
            where = "stage 'speech'"
            progress.emit(row.id, "speech")
            speech = await speech_task(row, assets, settings)
            if skipped := warnings.skip_reasons(speech, settings):
                return _row_skipped(row, assets, warnings.row_warnings(image_flags, assets, speech), *skipped)
            where = "stage 'plan'"
            row_plan = await plan_task(row, assets, speech, settings)
            # Timings the aligner itself distrusts are not used: captions then spread evenly (flagged).
            words = speech.words
            if speech.approximate and assets.script:
                words = captions.even_spread_words(assets.script, assets.duration_s)
            cues = captions.cues_from_words(words, until=assets.duration_s)
        where = "stage 'generate'"
        progress.emit(row.id, "generate", f"{row_plan.total_clips} clips")
        results = await _generate_row(row, assets, row_plan, cues, backend, settings, batch_key)
        where = "stage 'stitch'"
        async with pool_run.cpu_gate():  # stitched as soon as the row's last segment is done
            progress.emit(row.id, "stitch")
            published = await stitch_task(row, assets, cues, list(results), out, settings)
    except RowFailure as exc:
        return _row_failed(row, exc.where, exc.reason)
    except GenerationFailed as exc:
        return _row_failed(row, where, str(exc))
    except Exception as exc:  # a bug or an environment problem: still this row's failure only
        if disk := output_place.describe_disk_failure(exc, out, row_dir):
            return _row_failed(row, where, disk)
        logger.exception("row %s failed unexpectedly at %s", row.id, where)
        return _row_failed(row, where, f"{type(exc).__name__}: {exc}")

    flags = warnings.row_warnings(image_flags, assets, speech, row_plan)
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
    for flag in flags:  # the row succeeded, but an operator should look at it
        logger.warning("row %s: %s", row.id, flag)
    logger.info("row %s done in %.1fs: %s", row.id, time.monotonic() - started, result.video)
    progress.emit(row.id, "done", "succeeded")
    return states.row_state(result)


@flow(name="row", validate_parameters=False)
async def invalid_row(row: int, id: str | None, error: str) -> State:  # noqa: A002 - the manifest's column
    """A manifest row that did not validate: a row run of its own, `Invalid` (Failed) with every problem."""
    get_run_logger().error("%s", error)
    progress.emit(id or f"row {row}", "failed", error)
    return states.row_failed(error, invalid=True)


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
    if invalid := len(validation.issues_by_row()):
        logger.warning("%d rows do not validate: each is a row run of its own, Invalid, naming its problems", invalid)
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


def _batch_run_name() -> str:
    """A batch run is named after its manifest and the time it started (UTC), e.g. `june 2025-06-01 02:00`."""
    manifest = str(flow_run.get_parameters().get("manifest", "batch"))
    stem = manifest.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] or "batch"
    return f"{stem} {datetime.now(UTC):%Y-%m-%d %H:%M}"


@flow(name="batch", flow_run_name=_batch_run_name)
async def batch(manifest: str, out: str, settings: BatchSettings | None = None) -> State:
    """Run every row of `manifest` and write `out/report.json`.

    Ends `Completed`, `Partial` (some rows failed) or `Failed` (rows failed, none succeeded), each
    with the report (flows/states.py; called directly, a Failed batch raises states.BatchFailed
    holding it). Raises ManifestError / BackendError when the batch as a whole cannot run.
    """
    settings = settings or BatchSettings()
    work_dir = settings.work_dir or str(layout.default_work_dir(out))
    try:  # before any work: a place the batch cannot write, or another run writing there, stops it
        await asyncio.to_thread(output_place.check_places, out, work_dir)
        lock = await asyncio.to_thread(runlock.acquire, out, f"batch of {manifest}")
    except (output_place.OutputError, runlock.RunLocked) as exc:
        await _notify_batch_error(manifest, out, settings, exc)
        raise
    try:
        # What a killed run left half-written, where the lock says no other run writes now: the output
        # (the default work folder is inside it). A work folder set apart may be shared by batches with
        # other outputs, so there only this batch's rows' folders are cleaned (_run_batch).
        await asyncio.to_thread(storage.remove_leftover_parts, out)
        return await _run_batch(manifest, out, settings, work_dir)
    finally:
        lock.release()


async def _notify_batch_error(manifest: str, out: str, settings: BatchSettings, exc: Exception) -> None:
    if settings.webhook_url:
        await notify_task.with_options(task_run_name="notify batch")(
            settings.webhook_url, notify.batch_error_payload(manifest, out, str(exc)), settings)


async def _run_batch(manifest: str, out: str, settings: BatchSettings, work_dir: str) -> State:
    logger = get_run_logger()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    key = report.batch_key(manifest, out)
    try:
        backend, validation, pool, workers = await _prepare(manifest, settings)
    except Exception as exc:  # the batch cannot run at all: no rows, no report
        await _notify_batch_error(manifest, out, settings, exc)
        raise
    if settings.work_dir:
        for row in validation.rows:
            await asyncio.to_thread(storage.remove_leftover_parts, layout.RowPaths.for_row(Path(work_dir), row.id).root)
    limit = asyncio.Semaphore(settings.max_concurrent_rows)
    # With the pool, `limit` gates the rows' CPU stages only (pool_run.cpu_gate), not whole rows.
    row_limit = limit if pool is None else contextlib.nullcontext()

    async def run_row(row: ManifestRow) -> RowResult:
        async with row_limit:
            state = await process_row.with_options(flow_run_name=f"row {row.row}: {row.id}")(
                row, out, work_dir, backend, settings, key, return_state=True
            )
            if state.is_completed():
                result = await state.aresult()
            else:
                result = RowResult(row=row.row, id=row.id, status="failed", backend=backend,
                                   error=state.message or row_error(row.row, row.id, "row flow", state.name))
        await _told(result, row.webhook, out)
        return result

    async def reject_row(number: int, issues: list) -> RowResult:
        error = "; ".join(str(i) for i in issues)
        await invalid_row.with_options(flow_run_name=f"row {number}: {issues[0].id or '?'}")(
            number, issues[0].id, error, return_state=True)
        result = RowResult(row=number, id=issues[0].id, status="failed", error=error)
        await _told(result, None, out)
        return result

    async def _told(result: RowResult, webhook: str | None, out: str) -> None:
        if not result.cached:
            states.emit_row_event(result, key, manifest, out)
        if webhook and not result.cached:
            await notify_task.with_options(task_run_name=f"notify row {result.id}")(
                webhook, notify.row_payload(result, out), settings)

    async with pool_run.serving(pool, limit) if pool is not None else contextlib.nullcontext():
        row_results = list(await asyncio.gather(
            *(run_row(r) for r in validation.rows),
            *(reject_row(n, issues) for n, issues in validation.issues_by_row().items()),
        ))
    row_results.sort(key=lambda r: r.row)
    if pool is not None:
        workers = [dataclasses.asdict(w) for w in pool.workers]
    gpu_s = sum(r.gpu_s or 0.0 for r in row_results if not r.cached)
    result = report_json(Report(
        manifest=manifest, output=out, backend=backend, started_at=started_at,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"), rows=row_results,
        gpu=settings.gpu_kind, price_per_gpu_hour=settings.gpu_price_per_hour, gpu_s=gpu_s,
        cost=gpu_money(gpu_s, settings.gpu_price_per_hour), workers=workers,
    ))
    result |= await asyncio.to_thread(_write_report, out, result)
    await report.publish(result, key)
    final = states.batch_state(result)
    logger.info("batch done: %s", final.message)
    states.emit_batch_event(result, key)
    if settings.webhook_url:
        await notify_task.with_options(task_run_name="notify batch")(
            settings.webhook_url, notify.batch_payload(result), settings)
    return final


def _write_report(out: str, report: dict) -> dict:
    """Write OUT/report.json; when that fails (a disk that filled up at the very end), {"report_error": why}:
    the rows' results are kept in their markers and the returned report, so the batch still ends normally."""
    uri = layout.report_uri(out)
    try:
        storage.write_text(uri, json.dumps(report, indent=2))
    except Exception as exc:
        why = output_place.describe_disk_failure(exc, out) or f"{type(exc).__name__}: {exc}"
        get_run_logger().error("could not write the report %s: %s", uri, why)
        return {"report_error": f"could not write {uri}: {why}"}
    return {}


def _step_timings(results: list[SegmentResult]) -> dict:
    """The row's median denoising step and the end of its first step, from its new clips."""
    timings = [c.timings for r in results for c in r.clips if c.timings]
    steps = sorted(t["step_s"] for t in timings if "step_s" in t)
    firsts = [t["first_step_at"] for t in timings if "first_step_at" in t]
    return {"step_s": steps[len(steps) // 2] if steps else None, "first_step_at": min(firsts) if firsts else None}



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
    # Likewise only when not the default: a row's precision (validated to be the batch's) and the image and
    # mismatch policies.
    defaults = (("precision", DEFAULT_PRECISION), ("image_policy", "warn"), ("mismatch_policy", "skip"))
    optional |= {k: getattr(settings, k) for k, default in defaults if getattr(settings, k) != default}
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
