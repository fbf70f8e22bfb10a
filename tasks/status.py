"""Where a batch stands, read from its output and work folders (no Prefect needed).

Every row leaves a trail a reader can trust because it is written atomically: the plan
(`plan.json`), each finished clip (`seg_NNN/clip_NNNN.mp4`), and the done marker
(`OUT/.s2v/rows/<id>.json`). From those: state, clips done of clips planned, GPU time used
and an estimate of what remains, both in the report's GPU seconds (`tasks.records.GPU_SECONDS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tasks import layout, runlock, storage
from tasks.records import Plan, RowResult


@dataclass
class SegmentStatus:
    index: int
    clips_done: int
    clips: int
    est_gpu_s: float | None


@dataclass
class RowStatus:
    id: str
    state: str
    """'succeeded', 'failed', 'skipped' (finished); while a run holds the output 'generating', 'planned'
    or 'preparing'; with no run holding it, an unfinished row is 'interrupted' (a rerun resumes it)."""
    clips_done: int = 0
    clips: int | None = None
    gpu_s: float | None = None
    est_remaining_gpu_s: float | None = None
    error: str | None = None
    flags: list[str] = field(default_factory=list)
    """What the checks flagged on a finished row (tasks/speech, tasks/normalize/image.py)."""
    segments: list[SegmentStatus] = field(default_factory=list)


def batch_status(out: str, work_dir: str | Path | None = None, running: bool | None = None) -> list[RowStatus]:
    """Status of every row the batch writing to `out` has touched, by id. `running`: whether a run holds
    the output now (default: asked of its lock, tasks/runlock.py); without one nothing is in progress."""
    if running is None:
        running = runlock.holder(out) is not None
    work = Path(work_dir) if work_dir else layout.default_work_dir(out)
    report = _read_json(layout.report_uri(out)) or {}
    reported = {r["id"]: RowResult.model_validate(r) for r in report.get("rows", []) if r.get("id")}
    started = {p.name for p in work.iterdir() if p.is_dir()} if work.is_dir() else set()
    ids = sorted(started | set(reported))
    rows = []
    for row_id in ids:
        marker = _read_json(layout.marker_uri(out, row_id))
        finished = RowResult.model_validate(marker["result"]) if marker else reported.get(row_id)
        status = _row_status(row_id, layout.RowPaths.for_row(work, row_id), finished)
        if not running and status.state in IN_PROGRESS:
            status.state = "interrupted"
        rows.append(status)
    return rows


IN_PROGRESS = ("preparing", "planned", "generating")


def _row_status(row_id: str, paths: layout.RowPaths, finished: RowResult | None) -> RowStatus:
    status = RowStatus(id=row_id, state="preparing")
    if paths.plan_json.exists():
        plan = Plan.model_validate_json(paths.plan_json.read_text())
        status.state = "planned"
        status.clips = plan.total_clips
        remaining = 0.0
        for seg in plan.segments:
            done = min(seg.clips, len(paths.clips(seg.index)))
            status.segments.append(SegmentStatus(seg.index, done, seg.clips, seg.est_gpu_s))
            status.clips_done += done
            if seg.est_gpu_s is not None:
                remaining += seg.est_gpu_s * (seg.clips - done) / seg.clips
        status.est_remaining_gpu_s = remaining
        if status.clips_done:
            status.state = "generating"
    if finished is not None:
        status.state = finished.status
        status.error = finished.error
        status.flags = list(finished.flags)
        status.gpu_s = finished.gpu_s
        if finished.status == "succeeded":
            status.clips_done = finished.clips or status.clips_done
            status.clips = finished.clips or status.clips
            status.est_remaining_gpu_s = 0.0
    return status


def _read_json(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_text(uri))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
