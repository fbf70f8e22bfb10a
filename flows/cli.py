"""The `s2v-batch` command line.

Exit codes (`flows/states.py` owns the batch's): 0 the command ran (for `run`: every row
succeeded or was skipped); 1 `run`: some rows failed, others succeeded (state `Partial`),
or `validate` found invalid rows; 2 a usage error, or the batch or command could not run at
all (bad manifest, bad option, no checkpoint, unreachable service); 3 `run`: no row succeeded
and some failed (state `Failed`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

import typer
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.table import Table

from flows import interrupt, local_api
from flows.settings import BatchSettings, SettingsError, config_file, load_settings
from flows.views import hours, plan_summary_table, print_report

# Stage modules log through the standard library; let those records reach Prefect's UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,model")

def _untyped_help(cls: type) -> type:
    """`cls` whose --help option shows no value type (typer 0.29 labels it `<bool>`)."""

    class Untyped(cls):
        def get_help_option(self, ctx):  # noqa: ANN001, ANN202 - typer's signature
            option = super().get_help_option(ctx)
            if option is not None:
                option.metavar = ""
            return option

    return Untyped


_Command, _Group = _untyped_help(typer.core.TyperCommand), _untyped_help(typer.core.TyperGroup)


app = typer.Typer(
    name="s2v-batch",
    help="Turn CSV manifests of scripts, speech audio and portraits into talking-person videos (Wan2.2-S2V).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)
command = functools.partial(app.command, cls=_Command)
console = Console(stderr=True)
out_console = Console()

ManifestArg = Annotated[str, typer.Argument(help="CSV manifest: a local path or s3://bucket/key.csv",
                                             metavar="MANIFEST")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON", metavar="")]
ConfigOpt = Annotated[
    str | None, typer.Option("--config", help="TOML settings file (default: $S2V_CONFIG, else ./s2v-batch.toml)",
                             metavar="FILE")
]
METAVARS = {
    "checkpoint": "PATH|URI", "work_dir": "FOLDER", "alignment_model": "FOLDER", "whisper_model": "FOLDER",
    "clip_store": "FOLDER|URI", "calibration": "FILE", "distilled_lora": "FILE|URI", "lora": "FILE|URI",
    "allowed_roots": "FOLDER|URI", "webhook_url": "URL", "ray_address": "ADDRESS", "device": "DEVICE",
    "generator_factory": "MODULE:CALLABLE", "gpu_kind": "GPU", "gpu_price_per_hour": "PRICE",
}
"""What a setting's value is, for --help (typer 0.29 prints the Python type, e.g. `<str>`)."""
OLD_SPELLINGS = {
    "max_concurrent_rows": ("--concurrency",),
    "max_segment_s": ("--max-segment-seconds",),
    "pool_workers": ("--workers",),
    "allowed_roots": ("--allowed-root",),
}
"""Option names from before the options were generated from the settings; scripts may still use them."""


class CommandFailed(Exception):
    """The command could not run; the message says why and what to fix."""


def _settings(config: str | None = None, **overrides) -> BatchSettings:
    try:
        return load_settings(config, **overrides)
    except SettingsError as exc:
        raise CommandFailed(str(exc)) from None


def _setting_option(name: str, field: FieldInfo) -> inspect.Parameter | None:
    """The option of one setting: `--name-with-dashes` (`--x/--no-x` for a switch), its description as help,
    a Literal's values as choices; None when not given, so the config file, S2V_* or the default decide."""
    kind = field.annotation
    if get_origin(kind) in (Union, types.UnionType):
        (kind,) = [a for a in get_args(kind) if a is not type(None)]
    if kind is SecretStr:
        return None  # secrets stay off command lines (shell history, `ps`): S2V_* or the config file
    flag, as_json = "--" + name.replace("_", "-"), get_origin(kind) is dict
    option = typer.Option(
        f"{flag}/--no-{flag[2:]}" if kind is bool else flag, *OLD_SPELLINGS.get(name, ()), help=field.description,
        parser=json.loads if as_json else None, metavar=_metavar(name, kind),
        rich_help_panel="Settings (also S2V_<NAME> or the config file)",
    )
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, option])


def _metavar(name: str, kind) -> str | None:  # noqa: ANN001 - a type annotation
    """How --help names a setting's value: a word a person reads; None for choices (typer lists them)."""
    if name in METAVARS:
        return METAVARS[name]
    if kind is bool:
        return ""  # a switch takes no value
    if get_origin(kind) is dict:
        return "JSON"
    if get_origin(kind) is list:
        kind = get_args(kind)[0]
    if kind is int:
        return "N"
    if kind is float:
        return "SECONDS" if name.endswith("_s") else "NUMBER"
    return None if get_origin(kind) is Literal else "TEXT"


_SETTING_OPTIONS = {
    name: option for name, field in BatchSettings.model_fields.items() if (option := _setting_option(name, field))
}


def _with_settings(command: Callable[..., None]) -> Callable[..., None]:
    """`command` with --config and an option per setting, called with the `settings` they make."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]
    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt)

    def with_settings(*args, config: str | None = None, **options) -> None:
        given = {name: options.pop(name) for name in _SETTING_OPTIONS}
        command(*args, settings=_settings(config, **given), **options)

    functools.update_wrapper(with_settings, command)  # typer takes the command's name and help from it
    params = [*own, config, *_SETTING_OPTIONS.values()]
    with_settings.__signature__ = inspect.Signature(params)
    with_settings.__annotations__ = {p.name: p.annotation for p in params}
    return with_settings


@command()
@_with_settings
def run(
    manifest: ManifestArg,
    out: Annotated[str, typer.Option("--out", "-o", help="output folder: a local path or s3://bucket/prefix",
                                     metavar="FOLDER|URI")],
    settings: BatchSettings,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", metavar="", help="also print Prefect's run logs (always in the Prefect UI) and tracebacks"
    )] = False,
) -> None:
    """Run a manifest as a batch: every good row becomes OUT/<id>.mp4 with .srt/.vtt captions;
    the batch ends with OUT/report.json (also artifacts in Prefect). Exits 0 when no row failed,
    1 when some rows failed (Partial), 3 when rows failed and none succeeded (Failed)."""
    if not verbose:
        # The terminal shows the progress bar, warnings and the report; every log line still
        # reaches the Prefect API. Must be set before Prefect is imported (it configures logging then).
        for name in ("CONSOLE", "CONSOLE_FLOW_RUNS", "CONSOLE_TASK_RUNS"):
            os.environ.setdefault(f"PREFECT_LOGGING_HANDLERS_{name}_LEVEL", "WARNING")
    from flows.states import exit_code

    report = _run_batch(manifest, out, settings)
    print_report(out_console, report, out)
    raise typer.Exit(exit_code(report))


def _run_batch(manifest: str, out: str, settings) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows import progress as hooks
    from flows.batch import batch
    from flows.states import report_of
    from flows.steps import check_mode_settings, check_speed_settings
    from tasks.generate.backends import resolve_backend
    from tasks.manifest import validate_manifest

    with interrupt.signals_interrupt():
        # Fail fast, before Prefect starts, when the batch as a whole cannot run.
        backend = settings.generator_factory or resolve_backend(settings.backend, settings.checkpoint)
        try:
            check_speed_settings(settings)
            check_mode_settings(settings, backend)
        except SettingsError as exc:
            raise CommandFailed(str(exc)) from None
        _check_checkpoint(settings, backend)
        _check_prefect_api()
        total = validate_manifest(manifest, allowed_roots=settings.allowed_roots, check_files=False).total_rows
        _check_output(out, settings)
        local_api.start()  # without PREFECT_API_URL: a local API that outlives Ctrl-C, stopped last

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

        async def run_batch() -> dict:
            return await report_of(await batch(manifest, out, settings, return_state=True))

        unsubscribe = hooks.subscribe(on_event)
        try:
            return interrupt.run(run_batch())
        finally:
            unsubscribe()


def _check_output(out: str, settings: BatchSettings) -> None:
    """Before any work: a place the batch cannot write, or a live run writing there (the flow checks
    again and takes the lock; checking here first spares starting Prefect for nothing)."""
    from tasks import layout, output_place, runlock

    try:
        output_place.check_places(out, settings.work_dir or str(layout.default_work_dir(out)))
        if (holder := runlock.holder(out)) is not None:
            raise runlock.RunLocked(out, holder)
    except (output_place.OutputError, runlock.RunLocked) as exc:
        raise CommandFailed(str(exc)) from None



def _check_checkpoint(settings: BatchSettings, backend: str) -> None:
    """A checkpoint that is not there stops the batch here, before Prefect starts (the flow checks again)."""
    from tasks import storage

    if backend == "preview" or not settings.checkpoint:
        return
    try:
        found = storage.exists(settings.checkpoint)
    except Exception as exc:  # e.g. S3 credentials: the message names what to fix
        raise CommandFailed(storage.describe_access_error(settings.checkpoint, exc, "checkpoint")) from None
    if not found:
        raise CommandFailed(f"checkpoint not found: {settings.checkpoint} (setting checkpoint, S2V_CHECKPOINT)")


def _check_prefect_api() -> None:
    """With PREFECT_API_URL set, the server must answer (through Prefect's client: with PREFECT_API_KEY for
    Prefect Cloud); without it Prefect runs an ephemeral API."""
    from flows.run_status import api_problem

    if problem := asyncio.run(api_problem()):
        raise CommandFailed(problem)


@command(name="config")
def show_config(config: ConfigOpt = None) -> None:
    """Print the effective settings (defaults < config file < S2V_* environment < options), secrets hidden."""
    settings = _settings(config)
    table = Table("setting", "value", "environment variable", title="s2v-batch settings")
    for name in type(settings).model_fields:
        table.add_row(name, _show(getattr(settings, name)), f"S2V_{name.upper()}")
    out_console.print(table)
    path = Path(config) if config else config_file()
    out_console.print(f"config file: {path if path else 'none'}")


def _show(value) -> str:
    if isinstance(value, SecretStr):
        return "********" if value.get_secret_value() else ""
    return "" if value is None else str(value)


@command()
def status(
    target: Annotated[str, typer.Argument(help="an output folder (local or s3://) or a Prefect flow run id",
                                          metavar="OUT|RUN_ID")],
    work_dir: Annotated[str | None, typer.Option(help="the batch's work folder if not the default",
                                                       metavar="FOLDER")] = None,
) -> None:
    """Show each row's state, clips done of clips planned, GPU hours used and estimated remaining.
    Reads the output folder, or the Prefect API (PREFECT_API_URL) for a flow run id."""
    if re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", target):
        _status_from_prefect(target)
        return
    from tasks import runlock, storage
    from tasks.status import batch_status

    if not storage.exists(target):
        raise CommandFailed(f"{target} does not exist (give an output folder or a flow run id)")
    holder = runlock.holder(target)
    rows = batch_status(target, work_dir, running=holder is not None)
    table = Table("id", "state", "clips", "GPU h used", "GPU h left (est.)", "warnings", "error",
                  title=f"batch status: {target}")
    for r in rows:
        clips = f"{r.clips_done}/{r.clips}" if r.clips is not None else ""
        table.add_row(r.id, r.state, clips, hours(r.gpu_s), hours(r.est_remaining_gpu_s),
                      f"[yellow]{len(r.flags)}" if r.flags else "", r.error or "")
    out_console.print(table)
    for r in rows:
        for flag in r.flags:
            out_console.print(f"[yellow]warning[/yellow] {r.id}: {flag}", soft_wrap=True, markup=True)
    used = sum(r.gpu_s or 0 for r in rows)
    left = sum(r.est_remaining_gpu_s or 0 for r in rows)
    out_console.print(f"{len(rows)} rows; {sum(r.clips_done for r in rows)} clips done; "
                      f"GPU hours used {hours(used, 2)}, estimated remaining {hours(left, 2)}")
    out_console.print(f"running: {holder.describe()}" if holder else "no run is writing to this output now"
                      + ("; rerun the manifest to finish the interrupted rows" if any(
                          r.state == "interrupted" for r in rows) else ""))


def _status_from_prefect(run_id: str) -> None:
    from prefect.settings import PREFECT_API_URL

    from flows.run_status import RunNotFound, api_problem, read_batch_run

    api = PREFECT_API_URL.value()
    if not api:
        raise CommandFailed("PREFECT_API_URL is not set: point it at the Prefect server that ran the batch")
    if problem := asyncio.run(api_problem()):
        raise CommandFailed(problem)
    try:
        run, rows = asyncio.run(read_batch_run(run_id))
    except RunNotFound:
        raise CommandFailed(f"no flow run {run_id} on {api}") from None
    state = run.state.name if run.state else "?"
    out_console.print(f"flow run {run.name} ({run.id}): {state}"
                      + (f": {run.state.message}" if run.state and run.state.message else ""), soft_wrap=True)
    table = Table("row", "state", "stages done", "waiting / running / failed", "warnings or error")
    for row in rows:
        table.add_row(row.name, row.state, f"{row.stages_done}/{row.stages}", ", ".join(row.busy),
                      "" if row.state in ("Completed", "Cached") else row.message or "")
    out_console.print(table)


@command()
@_with_settings
def validate(manifest: ManifestArg, settings: BatchSettings, as_json: JsonOpt = False) -> None:
    """Check every row of a manifest (columns, values, paths, that files exist) without doing any work.
    Exits 1 when some rows are invalid."""
    from tasks.manifest import validate_manifest

    result = validate_manifest(manifest, allowed_roots=settings.allowed_roots, mode=settings.mode,
                               precision=settings.precision)
    if as_json:
        out_console.print_json(json.dumps({
            "rows": result.total_rows, "valid": len(result.rows),
            "issues": [i.model_dump() for i in result.issues],
        }))
    else:
        if result.issues:
            table = Table("row", "id", "column", "reason", title="problems")
            for i in result.issues:
                table.add_row(str(i.row), i.id or "", i.field, i.reason)
            out_console.print(table)
        if result.ignored_columns:
            out_console.print(f"columns outside the schema (usable as {{{{column}}}} in script and prompt): "
                              f"{', '.join(result.ignored_columns)}")
        out_console.print(f"{len(result.rows)} of {result.total_rows} rows valid")
    raise typer.Exit(1 if result.issues else 0)


@command()
@_with_settings
def plan(manifest: ManifestArg, settings: BatchSettings, as_json: JsonOpt = False) -> None:
    """Plan segments and clips for every valid row (normalizing and aligning audio, no generation)
    and estimate GPU time."""
    from flows.preflight import plan_manifest
    from tasks.cost import plans_to_json

    plans, problems = plan_manifest(manifest, settings, console=console)
    if as_json:
        data = plans_to_json(plans, settings.gpu_price_per_hour)
        for row, p in zip(data["rows"], plans, strict=True):
            row["warnings"] = p.flags
        data |= {"gpu": settings.gpu_kind, "price_per_gpu_hour": settings.gpu_price_per_hour, "errors": problems}
        out_console.print_json(json.dumps(data))
    else:
        from rich.markup import escape

        out_console.print(plan_summary_table(plans, settings.gpu_price_per_hour, gpu=settings.gpu_kind))
        for p in plans:  # the row's warnings, the alignment's fit first as their evidence
            if p.fit_score is not None and p.flags:
                out_console.print(f"[yellow]warning[/yellow] {escape(p.row_id)}: alignment fit {p.fit_score:.2f}")
            for flag in p.flags:
                out_console.print(f"[yellow]warning[/yellow] {escape(p.row_id)}: {escape(flag)}", soft_wrap=True)
        for p in problems:
            out_console.print(f"[red]{escape(p)}", soft_wrap=True)


@command()
@_with_settings
def calibrate(
    settings: BatchSettings,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="where the calibration JSON goes (then set "
                                      "--calibration / S2V_CALIBRATION to it)")] = Path("s2v-calibration.json"),
    image: Annotated[Path | None, typer.Option(metavar="FILE", help="reference portrait (default: example's)")] = None,
    audio: Annotated[Path | None, typer.Option(metavar="FILE", help="reference speech (default: example's)")] = None,
    clips: Annotated[int, typer.Option(
        min=1, metavar="N", help="clips of the reference segment (a first and later ones)"
    )] = 2,
) -> None:
    """Measure the speed presets on your weights (GPU): render a short reference segment exactly and with
    each preset (and in distilled mode when distilled_lora is set); print the speed-up and the drift from
    exact (PSNR/SSIM, whole frame and mouth); write a JSON with MagCache's ratios and the DiT passes per
    preset, which the presets and the plan read."""
    from tasks.calibrate import calibrate as run_calibration
    from tasks.calibrate import report_lines
    from tasks.generate.checkpoints import local_checkpoint

    if not settings.checkpoint:
        raise CommandFailed("calibrate needs the model: pass --checkpoint or set S2V_CHECKPOINT")
    folder = local_checkpoint(settings.checkpoint)
    doc = run_calibration(folder, out, image=image, audio=audio, num_clips=clips, device=settings.device,
                          offload=settings.offload, progress=lambda line: console.print(line),
                          distilled_lora=settings.distilled_lora)  # fmt: skip
    for line in report_lines(doc):
        out_console.print(line)
    out_console.print(f"written: {out}")


@command(name="align")
def align_cmd(
    audio: Annotated[Path, typer.Argument(help="speech audio file (any common format)", exists=True,
                                               metavar="AUDIO")],
    script: Annotated[str, typer.Option(help="the words spoken, as text", metavar="TEXT")],
    as_json: JsonOpt = False,
) -> None:
    """Align a script to speech audio with the offline aligner; print word timings in seconds."""
    from flows.preflight import align_file
    from tasks.speech import alignment_to_json

    analysis = align_file(audio, script)
    if as_json:
        out_console.print_json(json.dumps(alignment_to_json(analysis)))
        return
    table = Table("word", "start", "end", "score", title=f"{audio.name} ({analysis.aligner})")
    for w in analysis.words:
        table.add_row(w.word, f"{w.start:.3f}", f"{w.end:.3f}", "" if w.score is None else f"{w.score:.2f}")
    out_console.print(table)
    for flag in analysis.flags:
        out_console.print(f"[yellow]{flag}")


def main() -> None:
    """Entry point: usage errors shown as usage errors (exit 2), and one clear message instead of a
    traceback when the command cannot run (`-v` or S2V_DEBUG=1 shows the traceback)."""
    from tasks.generate.backends import BackendError
    from tasks.manifest_read import ManifestError
    from tasks.output_place import OutputError
    from tasks.runlock import RunLocked

    # The click that typer runs on: since typer 0.29 its own copy, whose exceptions are not click's.
    click = sys.modules[typer.BadParameter.__module__]
    verbose = bool(os.environ.get("S2V_DEBUG")) or bool({"-v", "--verbose"} & set(sys.argv[1:]))
    try:
        code = app(standalone_mode=False)
    except (ManifestError, BackendError, CommandFailed, OutputError, RunLocked, local_api.LocalApiError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(2)
    except click.ClickException as exc:  # a usage error: no such command, a missing argument, a bad value
        _show_usage_error(exc)
        sys.exit(exc.exit_code)
    except (interrupt.Interrupted, KeyboardInterrupt, typer.Abort) as exc:
        # The local API goes last: the flow needed it to record its end (flows/interrupt.py).
        local_api.stop()
        name = f" ({exc})" if isinstance(exc, interrupt.Interrupted) else ""
        console.print(f"[red]interrupted{name}[/red]: finished rows and clips are kept; rerun to resume",
                      soft_wrap=True)
        interrupt.exit_now()
    except Exception as exc:  # e.g. a checkpoint that cannot load: one message
        if verbose:
            raise
        console.print(f"[red]error:[/red] the batch could not run: {type(exc).__name__}: {exc}", soft_wrap=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def _show_usage_error(exc: Exception) -> None:
    """The usage line, where to find help and the error, as typer shows them when it exits itself (and
    nothing more for no arguments at all: the help was printed)."""
    try:
        from typer.rich_utils import rich_format_error
    except ImportError:  # typer without rich
        exc.show()
    else:
        rich_format_error(exc)
