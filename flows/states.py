"""How a row and a batch ended, said the same way everywhere: Prefect states, events, exit codes.

A batch's outcome (`tasks.records.batch_outcome`) gives its final state, its exit code and its
webhook: `Completed` when no row failed, `Partial` (a Completed state with its own name) when
some rows failed and others succeeded, `Failed` when rows failed and none succeeded. A row's
subflow ends `Completed`, `Flagged` (succeeded with warnings), `Skipped` (a policy skipped it),
`Cached` (finished by an earlier run), `Failed` or `Invalid` (the manifest row did not validate);
its message holds the warnings or the error in full. Rows and batches are also Prefect events
(`s2v.row.<status>`, `s2v.batch.<outcome>`), so Automations can act on them.
"""

from __future__ import annotations

from prefect.events import emit_event
from prefect.states import Completed, Failed, State

from tasks import layout
from tasks.records import BatchOutcome, RowResult, batch_outcome

EXIT_CODES: dict[BatchOutcome, int] = {"succeeded": 0, "partial": 1, "failed": 3}
"""`s2v-batch run`'s exit code per outcome (2 is taken: the batch could not run, or a usage error)."""
STATE_NAMES: dict[BatchOutcome, str] = {"succeeded": "Completed", "partial": "Partial", "failed": "Failed"}
EVENT_TEXT_MAX = 4000
"""Longest error or warning text carried in an event (Prefect caps an event's size)."""


class BatchFailed(Exception):
    """The batch ran but no row succeeded; `report` is the batch's report (also in report.json)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message, report)
        self.report = report

    def __str__(self) -> str:
        return str(self.args[0])


def summary(report: dict) -> str:
    """One line: the counts, rows with warnings, where the report is."""
    counts = report["counts"]
    flagged = sum(1 for r in report["rows"] if r["status"] == "succeeded" and r.get("flags"))
    warned = f" ({flagged} with warnings)" if flagged else ""
    return (f"{counts['succeeded']} succeeded{warned}, {counts['failed']} failed, {counts['skipped']} skipped "
            f"of {len(report['rows'])} rows")


def batch_state(report: dict) -> State:
    """The batch flow's final state; its data is the report (on Failed, inside BatchFailed)."""
    outcome = batch_outcome(report["counts"], len(report.get("manifest_errors", [])))
    message = f"{STATE_NAMES[outcome]}: {summary(report)}"
    if outcome == "failed":
        return Failed(message=message, data=BatchFailed(message, report))
    return Completed(name=STATE_NAMES[outcome], message=message, data=report)


async def report_of(state: State) -> dict:
    """The report a finished batch state carries (Completed, Partial or Failed); raises what made the
    batch unable to run otherwise."""
    result = await state.aresult(raise_on_failure=False)
    if isinstance(result, BatchFailed):
        return result.report
    if isinstance(result, BaseException):
        raise result
    return result


def exit_code(report: dict) -> int:
    return EXIT_CODES[batch_outcome(report["counts"], len(report.get("manifest_errors", [])))]


def row_state(result: RowResult) -> State:
    """A finished row's subflow state (succeeded, skipped or cached) with its warnings as the message."""
    if result.cached:
        return Completed(name="Cached", message="finished in an earlier run", data=result)
    if result.status == "skipped":
        return Completed(name="Skipped", message=result.error, data=result)
    if result.flags:
        return Completed(name="Flagged", message=f"{len(result.flags)} warnings: " + "; ".join(result.flags),
                         data=result)
    return Completed(message=f"{result.video} ({result.duration_s:g} s)", data=result)


def row_failed(message: str, *, invalid: bool = False) -> State:
    """A failed row's subflow state; `invalid` when the manifest row itself did not validate."""
    return Failed(name="Invalid" if invalid else "Failed", message=message)


def _short(text: str | None) -> str | None:
    return text if text is None or len(text) <= EVENT_TEXT_MAX else text[: EVENT_TEXT_MAX - 1] + "…"


def emit_row_event(result: RowResult, batch_key: str, manifest: str, out: str) -> None:
    """`s2v.row.succeeded|failed|skipped` for one row, its resource `s2v.row.<batch key>.<row>`; Prefect adds
    the flow run it happened in as a related resource."""
    emit_event(
        event=f"s2v.row.{result.status}",
        resource={
            "prefect.resource.id": f"s2v.row.{batch_key}.{result.row}",
            "prefect.resource.name": result.id or f"row {result.row}",
            "s2v.row": str(result.row), "s2v.manifest": manifest, "s2v.output": out,
        },
        payload={"row": result.row, "id": result.id, "status": result.status, "error": _short(result.error),
                 "flags": [_short(f) for f in result.flags], "video": result.video, "cached": result.cached},
    )


def emit_batch_event(report: dict, batch_key: str) -> None:
    """`s2v.batch.succeeded|partial|failed` with the counts."""
    outcome = batch_outcome(report["counts"], len(report.get("manifest_errors", [])))
    emit_event(
        event=f"s2v.batch.{outcome}",
        resource={"prefect.resource.id": f"s2v.batch.{batch_key}", "prefect.resource.name": batch_key,
                  "s2v.manifest": report["manifest"], "s2v.output": report["output"]},
        payload={"counts": report["counts"], "summary": summary(report), "report": layout.report_uri(report["output"])},
    )
