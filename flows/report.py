"""The batch's report as an operator reads it: report.json's numbers, the Prefect artifacts, the artifact keys.

Every batch (a manifest into an output folder) has its own artifact key, so a rerun adds a
version of its own report and two batches never overwrite each other's. Two artifacts per
batch: a markdown report (`<key>`: the outcome, each row with links to its video and
captions, every warning and error in full) and a table (`<key>-table`, one line per row,
sortable in the UI, long texts cut by the UI).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from pathlib import Path

from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

from flows.states import STATE_NAMES, summary
from tasks import layout, storage
from tasks.records import Report, batch_outcome

DIGITS = {
    # seconds of audio or video: a millisecond is well below a 62.5 ms frame
    "duration_s": 3, "source_duration_s": 3, "trimmed_start_s": 3, "trimmed_end_s": 3,
    # GPU seconds: a tenth of a second of a segment that takes minutes
    "gpu_s": 1,
    # money: cents
    "cost": 2,
    # loudness and peaks: 0.1 dB is below what anyone hears
    "integrated_lufs": 1, "peak_dbfs": 1, "master_lufs": 1,
    # shares: 0.01 % of samples clipped; the face's height to 0.1 % of the frame
    "clipping_ratio": 4, "face_height_ratio": 3,
    # variance of the Laplacian: compared with a threshold of 50
    "sharpness": 1,
    # timings (step, load) and the Unix time of a first step: a millisecond
    "step_s": 3, "first_step_s": 3, "first_step_at": 3, "load_s": 3,
}
"""Decimals each number of report.json keeps (what means something; the full floats are noise)."""


def rounded(data):  # noqa: ANN001, ANN201 - JSON values
    """`data` with every number named in DIGITS rounded to its decimals, anywhere in the tree."""
    if isinstance(data, dict):
        return {k: round(v, DIGITS[k]) if isinstance(v, float) and k in DIGITS else rounded(v)
                for k, v in data.items()}
    if isinstance(data, list):
        return [rounded(v) for v in data]
    return data


def report_json(report: Report) -> dict:
    """report.json's content (and the batch flow's result): the report, its counts, numbers rounded."""
    data = report.model_dump(mode="json")
    data["counts"] = report.counts
    return rounded(data)


def batch_key(manifest: str, out: str) -> str:
    """The batch's artifact key: the manifest's name and a digest of manifest and output folder
    (artifact keys take lowercase letters, digits and dashes)."""
    stem = posixpath.basename(manifest.rstrip("/")).rsplit(".", 1)[0]
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:40] or "manifest"
    digest = hashlib.sha256(f"{manifest}\n{out}".encode()).hexdigest()[:8]
    return f"s2v-{slug}-{digest}"


def row_key(key: str, row_id: str, what: str) -> str:
    """The key of one row's artifact (clip progress, segments) within the batch `key`."""
    slug = re.sub(r"[^a-z0-9]+", "-", row_id.lower()).strip("-")[:40] or "row"
    return f"{key}-row-{slug}-{what}"


async def publish(report: dict, key: str) -> None:
    """The batch's markdown report and table as Prefect artifacts under its own key."""
    outcome = batch_outcome(report["counts"], len(report.get("manifest_errors", [])))
    await acreate_markdown_artifact(key=key, markdown=markdown(report),
                                    description=f"{STATE_NAMES[outcome]}: {summary(report)}")
    await acreate_table_artifact(
        key=f"{key}-table", table=[table_row(r) for r in report["rows"]],
        description=f"**{report['manifest']}** → {report['output']} · backend `{report['backend']}` · "
                    f"{STATE_NAMES[outcome]}: {summary(report)}",
    )


def table_row(r: dict) -> dict:
    status = r["status"] + (" (cached)" if r.get("cached") else "")
    if r["status"] == "succeeded" and r.get("flags"):
        status += f" ({len(r['flags'])} warnings)"
    return {
        "row": r["row"], "id": r.get("id") or "", "status": status,
        "duration_s": _blank(r.get("duration_s")), "clips": _blank(r.get("clips")), "gpu_s": _blank(r.get("gpu_s")),
        "video": r.get("video") or "", "error": r.get("error") or "", "warnings": "; ".join(r.get("flags") or []),
    }


def _blank(value) -> object:  # noqa: ANN001
    return "" if value is None else value


def markdown(report: dict) -> str:
    """The report for a person: outcome, rows with links, then every warning and error in full."""
    out = report["output"]
    outcome = batch_outcome(report["counts"], len(report.get("manifest_errors", [])))
    lines = [
        f"# {_md(report['manifest'])} → {_md(out)}",
        "",
        f"**{STATE_NAMES[outcome]}**: {summary(report)} · backend `{report['backend']}` · "
        f"GPU seconds {report.get('gpu_s') or 0:g}" + (f" · cost {report['cost']:,.2f}" if report.get("cost") else ""),
        "",
        f"Report: {_link('report.json', layout.report_uri(out))} · started {report['started_at']}, "
        f"finished {report['finished_at']}",
        "",
        "| row | id | status | video | captions | duration | warnings |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        video = _link(r["video"], _uri(out, r["video"])) if r.get("video") else ""
        captions = " ".join(_link(fmt, _uri(out, path)) for fmt, path in (r.get("captions") or {}).items())
        status = r["status"] + (" (cached)" if r.get("cached") else "")
        duration = f"{r['duration_s']:.1f} s" if r.get("duration_s") else ""
        lines.append(f"| {r['row']} | {_md(r.get('id') or '')} | {status} | {video} | {captions} | {duration} | "
                     f"{len(r.get('flags') or []) or ''} |")
    warned = [r for r in report["rows"] if r.get("flags")]
    if warned:
        lines += ["", "## Warnings", ""]
        for r in warned:
            lines.append(f"- **row {r['row']} ({_md(r.get('id') or '')})**, {r['status']}:")
            lines += [f"  - {_md(flag)}" for flag in r["flags"]]
    failed = [r for r in report["rows"] if r["status"] in ("failed", "skipped") and r.get("error")]
    if failed or report.get("manifest_errors"):
        lines += ["", "## Errors and skipped rows", ""]
        lines += [f"- **{r['status']}**: {_md(r['error'])}" for r in failed]
        lines += [f"- **manifest**: {_md(e)}" for e in report.get("manifest_errors", [])]
    return "\n".join(lines) + "\n"


def _uri(out: str, relative: str) -> str:
    return storage.join(out, relative)


def _link(text: str, uri: str) -> str:
    target = uri if storage.is_remote(uri) or "://" in uri else Path(uri).resolve().as_uri()
    return f"[{_md(text)}]({target.replace(' ', '%20').replace(')', '%29')})"


def _md(text: str) -> str:
    """Text shown as itself in markdown (and in a table cell)."""
    return re.sub(r"([\\`*_{}\[\]<>()#+!|])", r"\\\1", str(text)).replace("\n", " ")

