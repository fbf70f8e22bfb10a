"""What the command line prints as tables: the batch report, the plan summary, GPU hours and money.

flows/cli.py parses and runs the commands; these functions only turn records into rich output.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

from tasks.records import Plan


def print_report(console: Console, report: dict, out: str) -> None:
    """The batch's report as `run` ends: a table of rows, their warnings, the outcome, GPU hours."""
    from rich.markup import escape

    from flows.states import STATE_NAMES, summary
    from tasks.layout import report_uri
    from tasks.records import batch_outcome

    table = Table("row", "id", "status", "duration", "video / error", title=f"s2v-batch report ({report['backend']})")
    colors = {"succeeded": "green", "failed": "red", "skipped": "yellow"}
    for r in report["rows"]:
        status = f"[{colors[r['status']]}]{r['status']}" + (" (cached)" if r.get("cached") else "")
        if r["status"] == "succeeded" and r.get("flags"):
            status = f"[yellow]succeeded, {len(r['flags'])} warning{'s' if len(r['flags']) > 1 else ''}"
        detail = escape(r.get("video") or r.get("error") or "")
        duration = f"{r['duration_s']:.1f}s" if r.get("duration_s") else ""
        table.add_row(str(r["row"]), escape(r.get("id") or ""), status, duration, detail)
    console.print(table)
    warned = [r for r in report["rows"] if r["status"] == "succeeded" and r.get("flags")]
    if warned:
        console.print("[yellow]warnings[/yellow] (the videos were made; look at them before publishing):")
        for r in warned:
            for flag in r["flags"]:
                console.print(f"  row {r['row']} ({escape(r.get('id') or '')}): {escape(flag)}", soft_wrap=True)
    outcome = batch_outcome(report["counts"], len(report.get("manifest_errors", [])))
    color = {"succeeded": "green", "partial": "yellow", "failed": "red"}[outcome]
    where = f"[red]{report['report_error']}[/red]" if report.get("report_error") else f"report: {report_uri(out)}"
    console.print(f"[{color}]{STATE_NAMES[outcome]}[/{color}]: {summary(report)}; {where}", soft_wrap=True)
    if report.get("gpu_s"):
        cost = f", cost {money(report['cost'])}" if report.get("cost") is not None else ""
        console.print(f"GPU hours ({report.get('gpu') or 'GPU'}): {hours(report['gpu_s'], 2)}{cost}")
    if report["backend"] == "preview":
        console.print("[yellow]backend 'preview': labelled animatics, not model output. "
                          "Set --checkpoint to generate with Wan2.2-S2V.")


def hours(seconds: float | None, digits: int = 3, unknown: str = "") -> str:
    return unknown if seconds is None else f"{seconds / 3600:.{digits}f}"


def plan_summary_table(plans: Iterable[Plan], price_per_gpu_hour: float | None = None, gpu: str = "H100") -> Table:
    """Rows, segments, clips, audio length and estimated GPU hours (and cost, given a price per
    GPU-hour), with the batch total.

    A row whose cost is unknown (no figure for its GPU/resolution) shows "?" and makes
    the total a lower bound, marked with "≥".
    """
    from tasks.cost import gpu_money

    table = Table(title=f"Plan ({gpu})", show_footer=True)
    plans = list(plans)
    totals = {"segments": 0, "clips": 0, "frames": 0, "audio": 0.0, "gpu": 0.0}
    unknown = False
    rows = []
    for p in plans:
        estimates = [s.est_gpu_s for s in p.segments]
        row_gpu = None if any(g is None for g in estimates) else sum(estimates)
        unknown |= row_gpu is None
        audio = p.segments[-1].end_s - p.segments[0].start_s if p.segments else 0.0
        totals["segments"] += len(p.segments)
        totals["clips"] += p.total_clips
        totals["frames"] += p.total_frames
        totals["audio"] += audio
        totals["gpu"] += row_gpu or 0.0
        rows.append((p.row_id + (" ~" if p.approximate else "") + (f" [yellow]⚠{len(p.flags)}" if p.flags else ""),
                     str(len(p.segments)), str(p.total_clips),
                     str(p.total_frames), f"{audio:.1f}", hours(row_gpu, 2, "?"),
                     money(gpu_money(row_gpu, price_per_gpu_hour))))
    footers = [f"total ({len(plans)} rows)", str(totals["segments"]), str(totals["clips"]), str(totals["frames"]),
               f"{totals['audio']:.1f}", ("≥ " if unknown else "") + hours(totals["gpu"], 2, "?")]
    headers = ["row", "segments", "clips", "frames", "audio s", "est GPU h"]
    if price_per_gpu_hour is not None:
        headers.append("est cost")
        footers.append(("≥ " if unknown else "") + money(gpu_money(totals["gpu"], price_per_gpu_hour)))
    rows = [r[: len(headers)] for r in rows]
    for i, (header, footer) in enumerate(zip(headers, footers, strict=True)):
        table.add_column(header, footer=footer, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    notes = ["~ cuts placed without word timings (approximate)"] if any(p.approximate for p in plans) else []
    if any(p.flags for p in plans):
        notes.append("⚠N: N warnings, listed below")
    table.caption = "; ".join(notes) or None
    return table


def money(amount: float | None) -> str:
    return "?" if amount is None else f"{amount:,.2f}"
