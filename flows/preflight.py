"""The CPU-only steps before generation, run directly (no Prefect) for `s2v-batch plan` and `align`."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from flows import steps, warnings
from flows.settings import BatchSettings
from tasks import layout, speech
from tasks.manifest import validate_manifest
from tasks.normalize.audio import decode_audio
from tasks.records import MODEL_SAMPLE_RATE, ManifestRow, Plan, RowFailure, SpeechAnalysis, row_error


def plan_manifest(manifest: str, settings: BatchSettings, *, console: Console) -> tuple[list[Plan], list[str]]:
    """Normalize, align and plan every valid row; returns the plans and one message per failed row.

    Rows run in `settings.plan_processes` processes at once (default: one per available core), each
    loading its own aligner once; plans and messages come back in manifest order. Work files go to a
    cache folder keyed by the manifest, so planning twice (or planning then running with the same
    work folder) normalizes and aligns each row once.
    """
    validation = validate_manifest(manifest, allowed_roots=settings.allowed_roots, mode=settings.mode,
                                   precision=settings.precision)
    problems = [str(issue) for issue in validation.issues]
    work_dir = Path(settings.work_dir) if settings.work_dir else layout.plan_work_dir(manifest)
    rows = validation.rows
    processes = min(settings.plan_processes or available_cores(), len(rows))
    outcomes: list[Plan | str | None] = [None] * len(rows)
    with Progress(*Progress.get_default_columns(), console=console, transient=True) as progress:
        bar = progress.add_task("planning", total=len(rows))
        if processes <= 1:  # in this process: no start-up cost for a few rows, and a debugger sees the row
            for i, row in enumerate(rows):
                outcomes[i] = _guarded(row, work_dir, settings)
                progress.advance(bar)
        else:
            # spawn, not fork: the parent may hold threads (rich's refresh, torch's pools) that a fork
            # would copy mid-lock.
            pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_start_worker, initargs=(work_dir, settings, processes))
            try:
                futures = {pool.submit(_plan_in_worker, row): i for i, row in enumerate(rows)}
                for future in as_completed(futures):
                    row = rows[futures[future]]
                    try:
                        outcomes[futures[future]] = future.result()
                    except Exception as exc:  # noqa: BLE001 - its worker died (killed, out of memory)
                        outcomes[futures[future]] = _unexpected(row, exc)
                    progress.advance(bar)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: drop the queued rows, not wait for them
    plans = [o for o in outcomes if isinstance(o, Plan)]
    return plans, problems + [o for o in outcomes if isinstance(o, str)]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan_row(row: ManifestRow, work_dir: Path, settings: BatchSettings) -> Plan | str:
    """One row through normalize, image checks, speech and planning: its plan, or its one-line problem."""
    row_dir = layout.RowPaths.for_row(work_dir, row.id).root
    try:
        assets = steps.normalize_step(row, row_dir, settings)
        if (flags := steps.image_step(assets, settings)) and settings.image_policy == "skip":
            return row_error(row.row, row.id, "column 'image'", "skipped: " + "; ".join(flags))
        speech = steps.speech_step(row, assets, settings)
        if skipped := warnings.skip_reasons(speech, settings):  # as `run` would: no GPU time planned
            return row_error(row.row, row.id, f"skipped by {skipped[1]}", "; ".join(skipped[0]))
        row_plan = steps.plan_step(row, assets, speech, settings)
        return row_plan.model_copy(update={"flags": warnings.row_warnings(flags, assets, speech, row_plan)})
    except RowFailure as exc:
        return row_error(row.row, row.id, exc.where, exc.reason)


def _guarded(row: ManifestRow, work_dir: Path, settings: BatchSettings) -> Plan | str:
    try:
        return plan_row(row, work_dir, settings)
    except Exception as exc:  # noqa: BLE001 - a bug or an unexpected library error stays this row's message
        return _unexpected(row, exc)


def _unexpected(row: ManifestRow, exc: BaseException) -> str:
    return row_error(row.row, row.id, "planning", f"unexpected error: {type(exc).__name__}: {exc}")


_worker: tuple[Path, BatchSettings] | None = None
"""The work folder and settings of this planning worker process, given once at its start."""


def _start_worker(work_dir: Path, settings: BatchSettings, processes: int) -> None:
    global _worker
    _worker = (work_dir, settings)
    # Cores shared out between the processes: torch (the CTC aligner, imported later) reads this
    # when it starts its thread pool; N processes each with N threads would fight over N cores.
    threads = str(max(1, available_cores() // processes))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, threads)


def _plan_in_worker(row: ManifestRow) -> Plan | str:
    assert _worker is not None, "planning worker used before _start_worker"
    return _guarded(row, *_worker)


def align_file(audio: Path, script: str) -> SpeechAnalysis:
    """Word timings of `script` in `audio`, in seconds from the start of the file as given."""
    samples = decode_audio(audio, MODEL_SAMPLE_RATE)
    return speech.align_words(samples, script, sample_rate=MODEL_SAMPLE_RATE)
