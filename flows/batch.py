"""The `batch` Prefect flow: validate a manifest, then run every row through the stages.

Composition only: each task below is a thin wrapper that runs one stage function from
`tasks/` in a worker thread (stages are blocking: ffmpeg, numpy, torch), so rows run
concurrently on the flow's event loop. Each row is its own subflow run, which keeps the
Prefect UI readable for large batches and lets one row fail without failing the others.

Generation on the GPU pool (`settings.pool`, tasks/generate/pool.py): the flow process
is the Ray driver. The batch starts one worker per GPU (each loads the model once), then
every row subflow queues all its segments at once and its generate tasks (one per
segment) wait on the pool, which serves the segments of all rows longest first and
retries them itself. The row limit then gates only the rows' CPU stages, so the queue
holds every planned row's segments, and a row is stitched as soon as its last segment
is done. Workers report to the flow, not to Prefect: only this process needs the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_progress_artifact, acreate_table_artifact, aupdate_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State

from flows import progress, steps
from flows.settings import BatchSettings
from tasks import captions, layout, notify, storage
from tasks.generate.backends import BackendError, resolve_backend
from tasks.manifest import ManifestError, validate_manifest
from tasks.records import (
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
)
from tasks.speech import language

if TYPE_CHECKING:
    from tasks.generate.pool import GeneratorPool, SegmentEvent

log = logging.getLogger(__name__)
REPORT_NAME = "report.json"


@dataclass
class _Generation:
    """The running batch's GPU pool and the gate that limits rows in their CPU stages.

    Set by `batch` for the duration of a batch that renders on the pool (one batch per
    process at a time); the row subflows and generate tasks run on the same event loop
    and find it here, since neither a pool nor a semaphore is a flow parameter.
    """

    pool: GeneratorPool
    cpu_gate: asyncio.Semaphore


_generation: _Generation | None = None


class _RowProgress:
    """Clips done out of clips planned for one row: a Prefect progress artifact, logs, the CLI hook.

    A plain class, not a dataclass: Prefect walks dataclass parameters of tasks, and this
    object is shared by the row's generate tasks.
    """

    def __init__(self, row: ManifestRow, plan: Plan):
        self.row = row
        self.plan = plan
        self.done: dict[int, int] = {}
        self.artifact = None
        self.last_update = 0.0

    async def start(self) -> None:
        self.artifact = await acreate_progress_artifact(
            progress=0.0, key=_artifact_key(self.row.id, "clips"),
            description=f"Clips rendered for row {self.row.row} ({self.row.id}): {self.plan.total_clips} planned "
                        f"in {len(self.plan.segments)} segments",
        )

    async def on_event(self, event: SegmentEvent) -> None:
        logger = get_run_logger()
        where = f"segment {event.segment_index}"
        if event.kind == "started":
            logger.info("%s: attempt %d/%d on %s, %d/%d clips done", where, event.attempt, event.attempts_max,
                        event.worker, event.clips_done, event.clips_total)
        elif event.kind == "clip":
            self.done[event.segment_index] = event.clips_done
            progress.emit(self.row.id, "clip", f"{where} clip {event.clips_done}/{event.clips_total}"
                          + (" (reused)" if event.reused else ""))
            await self._update(force=False)
        elif event.kind == "retry":
            logger.warning("%s: attempt %d/%d failed: %s", where, event.attempt, event.attempts_max, event.detail)
        elif event.kind == "failed":
            logger.error("%s failed after %d attempts: %s\n%s", where, event.attempt, event.detail,
                         event.traceback or "")
        elif event.kind == "done":
            logger.info("%s done on %s (attempt %d): %s", where, event.worker, event.attempt, event.detail)

    async def _update(self, force: bool) -> None:
        # Clips take minutes on a GPU but milliseconds in tests: at most one API call a second.
        if self.artifact is None or (not force and time.monotonic() - self.last_update < 1.0):
            return
        self.last_update = time.monotonic()
        done = sum(self.done.values())
        await aupdate_progress_artifact(self.artifact, round(100.0 * done / max(self.plan.total_clips, 1), 1))

    async def finish(self, results: list[SegmentResult | BaseException]) -> None:
        await self._update(force=True)
        table = []
        for i, r in enumerate(results):
            if isinstance(r, SegmentResult):
                table.append({"segment": i, "state": "completed", "clips": len(r.clips), "reused": r.reused_clips,
                              "attempts": r.attempts, "worker": r.worker or "", "gpu_s": r.gpu_s, "error": ""})
            else:
                table.append({"segment": i, "state": "failed", "clips": self.done.get(i, 0), "reused": "",
                              "attempts": getattr(r, "attempts", ""), "worker": "", "gpu_s": "", "error": str(r)})
        await acreate_table_artifact(key=_artifact_key(self.row.id, "segments"), table=table,
                                     description=f"Segments of row {self.row.row} ({self.row.id})")


def _row_failed(row: ManifestRow, where: str, reason: str) -> State:
    """The row subflow's final state when a row fails: Failed in the UI, with a message naming the
    row, the column or stage, and the cause (returned, not raised, so the log holds one line)."""
    message = f"row {row.row} (id {row.id!r}), {where}: {reason}"
    progress.emit(row.id, "failed", reason)
    return Failed(message=message)


def _is_transient(task, task_run, state) -> bool:
    """Retry I/O hiccups (network, S3), never a bad row: its error will not go away."""
    exc = state.data  # the task engine hands the raised exception over as the Failed state's data
    return isinstance(exc, OSError | ConnectionError | TimeoutError) and not isinstance(exc, FileNotFoundError)


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
    backend: str, settings: BatchSettings, tracker: _RowProgress | None = None,
) -> SegmentResult:
    segment = row_plan.segments[index]
    if _generation is not None and tracker is not None:
        # On the pool: this task only waits (retries happen in the pool, per segment).
        job, seg_dir = await asyncio.to_thread(steps.segment_job, row, assets, row_plan, cues, index)
        return await _run_on_pool(_generation.pool, job, seg_dir, tracker)

    def on_clip(clip: ClipResult) -> None:
        progress.emit(row.id, "clip", f"segment {index} clip {clip.index + 1}/{segment.clips}")

    return await asyncio.to_thread(
        steps.generate_step, row, assets, row_plan, cues, index, backend, settings, on_clip
    )


async def _run_on_pool(pool: GeneratorPool, job, seg_dir: Path, tracker: _RowProgress) -> SegmentResult:
    """Submit one segment and relay its events (state, attempts, clips) until it is done."""
    events: asyncio.Queue = asyncio.Queue()
    result = asyncio.ensure_future(pool.run_segment(job, seg_dir, events.put_nowait))
    while True:
        getter = asyncio.ensure_future(events.get())
        await asyncio.wait({result, getter}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            await tracker.on_event(getter.result())
        else:
            getter.cancel()
        if result.done():
            while not events.empty():
                await tracker.on_event(events.get_nowait())
            return result.result()


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


def _cpu_gate() -> contextlib.AbstractAsyncContextManager:
    """With the pool, rows take turns for their CPU stages only, so every row's segments can be queued."""
    return _generation.cpu_gate if _generation is not None else contextlib.nullcontext()


async def _generate_row(
    row: ManifestRow, assets: NormalizedAssets, row_plan: Plan, cues: list[Cue], backend: str,
    settings: BatchSettings,
) -> list[SegmentResult]:
    """All segments of the row at once: in this process, or queued on the batch's GPU pool."""
    indices = range(len(row_plan.segments))
    if _generation is None:
        return list(await asyncio.gather(*(
            generate_task(row, assets, row_plan, cues, i, backend, settings) for i in indices
        )))
    tracker = _RowProgress(row, row_plan)
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
        async with _cpu_gate():
            progress.emit(row.id, "normalize")
            assets = await normalize_task(row, row_dir, settings)
            where = "stage 'speech'"
            progress.emit(row.id, "speech")
            speech = await speech_task(row, assets, settings)
            if language.should_skip(speech):
                progress.emit(row.id, "done", "skipped")
                return RowResult(row=row.row, id=row.id, status="skipped", flags=speech.flags,
                                 error="; ".join(f for f in speech.flags if f != language.SKIP_FLAG),
                                 audio_qc=assets.audio_qc, image_qc=assets.image_qc)
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
        async with _cpu_gate():  # stitched as soon as the row's last segment is done
            progress.emit(row.id, "stitch")
            published = await stitch_task(row, assets, cues, list(results), out, settings)
    except RowFailure as exc:
        return _row_failed(row, f"column '{exc.field}'", exc.reason)
    except GenerationFailed as exc:
        return _row_failed(row, where, str(exc))
    except Exception as exc:  # a bug or an environment problem: still this row's failure only
        logger.exception("row %s failed unexpectedly at %s", row.id, where)
        return _row_failed(row, where, f"{type(exc).__name__}: {exc}")

    flags = list(speech.flags) + [f for f in row_plan.flags if f not in speech.flags]  # + unsafe cuts
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
        flags=flags, fit_score=speech.fit_score, words_not_found=[w.word for w in speech.words if not w.found],
        audio_qc=assets.audio_qc, image_qc=assets.image_qc,
    )
    await asyncio.to_thread(layout.mark_finished, out, row, fingerprint, result)
    logger.info("row %s done in %.1fs: %s", row.id, time.monotonic() - started, result.video)
    progress.emit(row.id, "done", "succeeded")
    return result


def use_pool(settings: BatchSettings, backend: str) -> bool:
    """'auto' renders on the pool for the model, or when a Ray cluster is named."""
    if settings.pool != "auto":
        return settings.pool == "on"
    return backend == "wan-s2v" or bool(settings.ray_address or os.environ.get("RAY_ADDRESS"))


async def _start_pool(settings: BatchSettings, backend: str) -> GeneratorPool:
    """Start the GPU workers (each loads the model once); a missing checkpoint fails before any starts."""
    from tasks.generate.pool import GeneratorPool, PoolConfig, PoolError

    logger = get_run_logger()
    if settings.checkpoint and not await asyncio.to_thread(storage.exists, settings.checkpoint):
        raise BackendError(f"checkpoint not found: {settings.checkpoint}")
    pool = GeneratorPool(PoolConfig(
        backend=backend, checkpoint=settings.checkpoint, device=settings.device, offload=settings.offload,
        backend_options=settings.generator_options, workers=settings.pool_workers, address=settings.ray_address,
        attempts=settings.segment_attempts, backoff_s=settings.retry_backoff_s,
        offload_on_oom=settings.offload_on_oom, store=settings.clip_store,
    ))
    try:
        workers = await asyncio.to_thread(pool.start)
    except PoolError as exc:
        raise BackendError(f"{exc} (or set pool=off to render in the flow process)") from None
    for line in pool.failed_workers:
        logger.warning("GPU worker could not start: %s", line)
    logger.info("GPU pool: %d workers: %s", len(workers), ", ".join(str(w) for w in workers))
    return pool


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
        backend = settings.generator_factory or resolve_backend(settings.backend, settings.checkpoint)
        validation = await asyncio.to_thread(validate_manifest, manifest, allowed_roots=settings.allowed_roots)
    except (ManifestError, BackendError) as exc:
        if settings.webhook_url:
            failed = {"manifest": manifest, "output": out, "started_at": started_at, "rows": [],
                      "manifest_errors": [str(exc)]}
            await notify_task.with_options(task_run_name="notify batch")(
                settings.webhook_url, notify.batch_payload(failed), settings)
        raise
    logger.info("manifest %s: %d rows, %d valid; backend %s%s", manifest, validation.total_rows,
                len(validation.rows), backend, " (labelled animatic, not the model)" if backend == "preview" else "")
    for issue in validation.issues:
        logger.warning("%s", issue)
    pool = None
    if validation.rows and use_pool(settings, backend):
        pool = await _start_pool(settings, backend)
    elif validation.rows:
        # Load the model before any row starts so a bad checkpoint fails the batch once, early.
        await asyncio.to_thread(steps.load_backend, backend, settings)
    work_dir = settings.work_dir or str(layout.default_work_dir(out))
    limit = asyncio.Semaphore(settings.max_concurrent_rows)
    global _generation
    _generation = _Generation(pool, limit) if pool is not None else None
    # With the pool, `limit` gates the rows' CPU stages only (see _cpu_gate), not whole rows.
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
                                   error=state.message or f"row {row.row} (id {row.id!r}): {state.name}")
        if row.webhook and not result.cached:
            await notify_task.with_options(task_run_name=f"notify row {row.id}")(
                row.webhook, notify.row_payload(result, out), settings)
        return result

    try:
        row_results = list(await asyncio.gather(*(run_row(r) for r in validation.rows)))
    finally:
        _generation = None
        if pool is not None:
            await asyncio.to_thread(pool.close)
    for row_number, issues in validation.issues_by_row().items():
        row_results.append(RowResult(
            row=row_number, id=issues[0].id, status="failed", error="; ".join(str(i) for i in issues)
        ))
    row_results.sort(key=lambda r: r.row)
    report = Report(
        manifest=manifest, output=out, backend=backend, started_at=started_at,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"), rows=row_results,
    )
    await asyncio.to_thread(storage.write_text, storage.join(out, REPORT_NAME),
                            json.dumps(report_json(report), indent=2))
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


def report_json(report: Report) -> dict:
    data = report.model_dump(mode="json")
    data["counts"] = report.counts
    return data


def _artifact_row(r: RowResult) -> dict:
    return {
        "row": r.row, "id": r.id or "", "status": r.status + (" (cached)" if r.cached else ""),
        "duration_s": r.duration_s if r.duration_s is not None else "",
        "clips": r.clips if r.clips is not None else "", "video": r.video or "", "error": r.error or "",
    }


def _relative(out: str, uri: str) -> str:
    prefix = out.rstrip("/") + "/"
    if storage.is_remote(out):
        return uri[len(prefix):] if uri.startswith(prefix) else uri
    return str(Path(uri).resolve().relative_to(Path(out).resolve()))


def _fingerprint_settings(settings: BatchSettings, backend: str) -> dict:
    keys = ("checkpoint", "pad_s", "max_segment_s", "min_segment_s", "infer_frames", "burn_captions",
            "language_policy")
    extra = {"generator_options": settings.generator_options} if settings.generator_factory else {}
    return {"backend": backend, **{k: getattr(settings, k) for k in keys}, **extra}


def _artifact_key(row_id: str, what: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return f"row-{re.sub(r'[^a-z0-9-]+', '-', row_id.lower()).strip('-')}-{what}"
