"""The `s2v-batch` command line.

Exit codes: 0 the command ran (for `run`: the batch ran, even if some rows failed);
1 `validate` found invalid rows; 2 the batch or command could not run at all (bad
manifest, bad option, no checkpoint, unreachable service).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

# Stage modules log through the standard library; let those records reach Prefect's UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,model")

app = typer.Typer(
    name="s2v-batch",
    help="Turn CSV manifests of scripts, speech audio and portraits into talking-person videos (Wan2.2-S2V).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()

ManifestArg = Annotated[str, typer.Argument(help="CSV manifest: a local path or s3://bucket/key.csv")]
AllowedRoot = Annotated[
    list[str] | None,
    typer.Option("--allowed-root", help="a folder or s3:// prefix rows may read from besides the manifest's "
                 "own folder (repeatable)"),
]


class CommandFailed(Exception):
    """The command could not run; the message says why and what to fix."""


ConfigOpt = Annotated[
    str | None, typer.Option("--config", help="TOML settings file (default: $S2V_CONFIG, else ./s2v-batch.toml)")
]


def _settings(config: str | None = None, **overrides):
    from flows.settings import SettingsError, load_settings

    try:
        return load_settings(config, **overrides)
    except SettingsError as exc:
        raise CommandFailed(str(exc)) from None


@app.command()
def run(
    manifest: ManifestArg,
    out: Annotated[str, typer.Option("--out", "-o", help="output folder: a local path or s3://bucket/prefix")],
    backend: Annotated[str | None, typer.Option(help="auto | preview | wan-s2v (auto: wan-s2v when a "
                                                     "checkpoint is set, else the preview animatic)")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="Wan2.2-S2V-14B checkpoint folder (local or s3://)")] = None,
    device: Annotated[str | None, typer.Option(help="torch device for wan-s2v, e.g. cuda:0")] = None,
    concurrency: Annotated[int | None, typer.Option(help="rows processed at the same time")] = None,
    allowed_root: AllowedRoot = None,
    language_policy: Annotated[str | None, typer.Option(help="non-English speech: warn | skip | fail")] = None,
    max_segment_seconds: Annotated[float | None, typer.Option(help="longest independently generated "
                                                                   "segment")] = None,
    burn_captions: Annotated[bool, typer.Option("--burn-captions", help="also burn captions into the "
                                                                         "video")] = False,
    force: Annotated[bool, typer.Option("--force", help="redo rows an earlier run finished")] = False,
    work_dir: Annotated[str | None, typer.Option(help="local scratch folder (default OUT/.s2v/work)")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster for the GPU pool (default: RAY_ADDRESS, "
                                                         "else a local Ray)")] = None,
    workers: Annotated[int | None, typer.Option(help="GPU workers in the pool (default: the cluster's GPUs)")] = None,
    offload: Annotated[bool, typer.Option("--offload", help="stream the model from CPU memory (GPUs of "
                                                            "24 GB and up)")] = False,
    alignment_model: Annotated[str | None, typer.Option(help="local Wav2Vec2ForCTC folder for forced "
                                                             "alignment (default: the offline aligner)")] = None,
    whisper_model: Annotated[str | None, typer.Option(help="local faster-whisper folder: transcribe rows "
                                                           "without a script, detect the spoken language")] = None,
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also print Prefect's run logs (they are "
                                                                  "always in the Prefect UI)")] = False,
) -> None:
    """Run a manifest as a batch: every good row becomes OUT/<id>.mp4 with .srt/.vtt captions;
    the batch ends with OUT/report.json (also a table artifact in Prefect)."""
    if not verbose:
        # The terminal shows the progress bar, warnings and the report; every log line still
        # reaches the Prefect API. Must be set before Prefect is imported (it configures logging then).
        for name in ("CONSOLE", "CONSOLE_FLOW_RUNS", "CONSOLE_TASK_RUNS"):
            os.environ.setdefault(f"PREFECT_LOGGING_HANDLERS_{name}_LEVEL", "WARNING")
    settings = _settings(
        config, backend=backend, checkpoint=checkpoint, device=device, max_concurrent_rows=concurrency,
        allowed_roots=allowed_root, language_policy=language_policy, max_segment_s=max_segment_seconds,
        burn_captions=burn_captions or None, force=force or None, work_dir=work_dir,
        ray_address=ray_address, pool_workers=workers, offload=offload or None,
        alignment_model=alignment_model, whisper_model=whisper_model,
    )
    report = _run_batch(manifest, out, settings)
    _print_report(report, out)


def _run_batch(manifest: str, out: str, settings) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows import progress as hooks
    from flows.batch import batch
    from tasks.generate.backends import resolve_backend
    from tasks.manifest import validate_manifest

    # Fail fast, before Prefect starts, when the batch as a whole cannot run.
    resolve_backend(settings.backend, settings.checkpoint)
    _check_prefect_api()
    total = validate_manifest(manifest, allowed_roots=settings.allowed_roots, check_files=False).total_rows

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"), console=console, transient=False,
    ) as bar:
        overall = bar.add_task("rows", total=total, detail="starting")
        finished: set[str] = set()

        def on_event(row_id: str, event: str, detail: str) -> None:
            if event in ("done", "failed"):
                finished.add(row_id)
                bar.update(overall, completed=len(finished), detail=f"{row_id}: {detail or event}"[:70])
            else:
                bar.update(overall, detail=f"{row_id}: {event} {detail}"[:70])

        unsubscribe = hooks.subscribe(on_event)
        try:
            return asyncio.run(batch(manifest, out, settings))
        finally:
            unsubscribe()


def _check_prefect_api() -> None:
    """With PREFECT_API_URL set, the server must answer; without it Prefect runs an ephemeral API."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        return
    try:
        httpx.get(f"{api.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise CommandFailed(
            f"cannot reach the Prefect API at {api} ({type(exc).__name__}); start the server or fix PREFECT_API_URL "
            "(unset it to run on a local ephemeral API)"
        ) from None


def _print_report(report: dict, out: str) -> None:
    table = Table(title=f"s2v-batch report ({report['backend']})")
    for col in ("row", "id", "status", "duration", "video / error"):
        table.add_column(col)
    colors = {"succeeded": "green", "failed": "red", "skipped": "yellow"}
    for r in report["rows"]:
        status = r["status"] + (" (cached)" if r.get("cached") else "")
        detail = r.get("video") or r.get("error") or ""
        duration = f"{r['duration_s']:.1f}s" if r.get("duration_s") else ""
        table.add_row(str(r["row"]), r.get("id") or "", f"[{colors[r['status']]}]{status}", duration, detail)
    out_console.print(table)
    counts = report["counts"]
    out_console.print(
        f"{counts['succeeded']} succeeded, {counts['failed']} failed, {counts['skipped']} skipped; "
        f"report: {out.rstrip('/')}/report.json"
    )
    if report["backend"] == "preview":
        out_console.print("[yellow]backend 'preview': labelled animatics, not model output. "
                          "Set --checkpoint to generate with Wan2.2-S2V.")


@app.command(name="config")
def show_config(config: ConfigOpt = None) -> None:
    """Print the effective settings (defaults < config file < S2V_* environment < options), secrets hidden."""
    from flows.settings import config_file

    settings = _settings(config)
    table = Table(title="s2v-batch settings")
    for col in ("setting", "value", "environment variable"):
        table.add_column(col)
    for name in type(settings).model_fields:
        table.add_row(name, _show(getattr(settings, name)), f"S2V_{name.upper()}")
    out_console.print(table)
    path = Path(config) if config else config_file()
    out_console.print(f"config file: {path if path else 'none'}")


def _show(value) -> str:
    from pydantic import SecretStr

    if isinstance(value, SecretStr):
        return "********" if value.get_secret_value() else ""
    return "" if value is None else str(value)


@app.command()
def status(
    target: Annotated[str, typer.Argument(help="an output folder (local or s3://) or a Prefect flow run id")],
    work_dir: Annotated[str | None, typer.Option(help="the batch's work folder if not the default")] = None,
) -> None:
    """Show each row's state, clips done of clips planned, GPU hours used and estimated remaining.
    Reads the output folder, or the Prefect API (PREFECT_API_URL) for a flow run id."""
    if re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", target):
        _status_from_prefect(target)
        return
    from tasks import storage
    from tasks.status import batch_status

    if not storage.exists(target):
        raise CommandFailed(f"{target} does not exist (give an output folder or a flow run id)")
    rows = batch_status(target, work_dir)
    table = Table(title=f"batch status: {target}")
    for col in ("id", "state", "clips", "GPU h used", "GPU h left (est.)", "error"):
        table.add_column(col)
    for r in rows:
        clips = f"{r.clips_done}/{r.clips}" if r.clips is not None else ""
        table.add_row(r.id, r.state, clips, _hours(r.gpu_s), _hours(r.est_remaining_gpu_s), r.error or "")
    out_console.print(table)
    used = sum(r.gpu_s or 0 for r in rows)
    left = sum(r.est_remaining_gpu_s or 0 for r in rows)
    out_console.print(f"{len(rows)} rows; {sum(r.clips_done for r in rows)} clips done; "
                      f"GPU hours used {used / 3600:.2f}, estimated remaining {left / 3600:.2f}")


def _hours(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 3600:.3f}"


def _status_from_prefect(run_id: str) -> None:
    import httpx
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        raise CommandFailed("PREFECT_API_URL is not set: point it at the Prefect server that ran the batch")
    try:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=15)
        if run.status_code == 404:
            raise CommandFailed(f"no flow run {run_id} on {api}")
        run.raise_for_status()
        children = httpx.post(f"{api}/flow_runs/filter", timeout=15, json={
            "flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}, "sort": "NAME_ASC"}).json()
        tasks = httpx.post(f"{api}/task_runs/filter", timeout=15, json={
            "flow_runs": {"id": {"any_": [c["id"] for c in children] or [run_id]}}}).json()
    except httpx.HTTPError as exc:
        raise CommandFailed(f"cannot reach the Prefect API at {api} (PREFECT_API_URL): {exc}") from None
    info = run.json()
    out_console.print(f"flow run {info['name']} ({info['id']}): {info['state_name']}")
    table = Table()
    for col in ("row", "state", "stages done", "running / failed"):
        table.add_column(col)
    for child in children:
        mine = [t for t in tasks if t["flow_run_id"] == child["id"]]
        done = sum(t["state_type"] == "COMPLETED" for t in mine)
        busy = ", ".join(t["name"] for t in mine if t["state_type"] in ("RUNNING", "FAILED", "CRASHED"))
        table.add_row(child["name"], child["state_name"], f"{done}/{len(mine)}", busy)
    out_console.print(table)


@app.command()
def validate(
    manifest: ManifestArg,
    allowed_root: AllowedRoot = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Check every row of a manifest (columns, values, paths, that files exist) without doing any work.
    Exits 1 when some rows are invalid."""
    from tasks.manifest import validate_manifest

    result = validate_manifest(manifest, allowed_roots=allowed_root or [])
    if as_json:
        out_console.print_json(json.dumps({
            "rows": result.total_rows, "valid": len(result.rows),
            "issues": [i.model_dump() for i in result.issues],
        }))
    else:
        if result.issues:
            table = Table(title="problems")
            for col in ("row", "id", "column", "reason"):
                table.add_column(col)
            for i in result.issues:
                table.add_row(str(i.row), i.id or "", i.field, i.reason)
            out_console.print(table)
        if result.ignored_columns:
            out_console.print(f"columns outside the schema (usable as {{{{column}}}} in script and prompt): "
                              f"{', '.join(result.ignored_columns)}")
        out_console.print(f"{len(result.rows)} of {result.total_rows} rows valid")
    raise typer.Exit(1 if result.issues else 0)


@app.command()
def plan(
    manifest: ManifestArg,
    allowed_root: AllowedRoot = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
) -> None:
    """Plan segments and clips for every valid row (normalizing and aligning audio, no generation)
    and estimate GPU time."""
    from flows.preflight import plan_manifest

    plans, problems = plan_manifest(manifest, _settings(allowed_roots=allowed_root), console=console)
    from tasks.plan import plan_summary_table, plans_to_json

    if as_json:
        data = plans_to_json(plans)
        data["errors"] = problems
        out_console.print_json(json.dumps(data))
    else:
        out_console.print(plan_summary_table(plans))
        for p in plans:  # the evidence per row: alignment fit, words not found, unsafe cuts
            if p.fit_score is not None and p.flags:
                out_console.print(f"[yellow]{p.row_id}: alignment fit {p.fit_score:.2f}")
            for flag in p.flags:
                out_console.print(f"[yellow]{p.row_id}: {flag}", soft_wrap=True)
        for p in problems:
            out_console.print(f"[red]{p}")


@app.command(name="align")
def align_cmd(
    audio: Annotated[Path, typer.Argument(help="speech audio file (any common format)", exists=True)],
    script: Annotated[str, typer.Option(help="the words spoken, as text")],
    as_json: Annotated[bool, typer.Option("--json", help="print {'words': [...]} as JSON")] = False,
) -> None:
    """Align a script to speech audio with the offline aligner; print word timings in seconds."""
    from flows.preflight import align_file
    from tasks.speech import alignment_to_json

    analysis = align_file(audio, script)
    if as_json:
        out_console.print_json(json.dumps(alignment_to_json(analysis)))
        return
    table = Table(title=f"{audio.name} ({analysis.aligner})")
    for col in ("word", "start", "end", "score"):
        table.add_column(col)
    for w in analysis.words:
        table.add_row(w.word, f"{w.start:.3f}", f"{w.end:.3f}", "" if w.score is None else f"{w.score:.2f}")
    out_console.print(table)
    for flag in analysis.flags:
        out_console.print(f"[yellow]{flag}")


def main() -> None:
    """Entry point with one clear message instead of a traceback when the command cannot run."""
    import click

    from tasks.generate.backends import BackendError
    from tasks.manifest import ManifestError

    try:
        code = app(standalone_mode=False)
    except (ManifestError, BackendError, CommandFailed) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.Abort):
        console.print("[red]interrupted[/red]: finished rows and clips are kept; rerun to resume")
        sys.exit(130)
    except Exception as exc:  # e.g. a checkpoint that cannot load: one message; S2V_DEBUG=1 shows the traceback
        if os.environ.get("S2V_DEBUG"):
            raise
        console.print(f"[red]error:[/red] the batch could not run: {type(exc).__name__}: {exc}", soft_wrap=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
