"""Manifest stage: validate every row of a CSV manifest (local or s3://) in one pass.

Reading the file is `tasks.manifest_read`: a manifest-level problem (not a CSV, a required
column missing) stops the batch there, before any work, with one message (`ManifestError`).
A row-level problem fails that row only: every problem of every row is reported with the
1-based data row number, the column and the reason, and the good rows go on.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from model.presets import DISTILLED_STEPS, PRESET_NAMES
from tasks import layout, storage
from tasks.manifest_read import REQUIRED_COLUMNS, _file_kind, _os_reason, read_manifest
from tasks.records import MODES, PRECISIONS, ManifestRow, Resolution, RowIssue

OPTIONAL_COLUMNS = (
    "script",
    "prompt",
    "negative_prompt",
    "pose_video",
    "language",
    "resolution",
    "seed",
    "steps",
    "guidance",
    "output",
    "webhook",
    "preset",
    "lora",
    "lora_strength",
    "mode",
    "precision",
)
TEMPLATE_COLUMNS = ("script", "prompt", "negative_prompt")
TEMPLATE_VARIABLE = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
PATH_COLUMNS = ("audio", "image", "pose_video")
DEFAULT_SEED = 42
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
LANGUAGE_PATTERN = re.compile(r"^[a-z]{2}$")
LIST_SEPARATOR = ";"
"""Separates several LoRAs (and their strengths) in one cell."""
MAX_LORA_STRENGTH = 10.0




@dataclass
class Validation:
    """Outcome of validating a manifest: the good rows and every row problem."""

    manifest: str
    rows: list[ManifestRow]
    issues: list[RowIssue]
    total_rows: int
    ignored_columns: list[str] = field(default_factory=list)

    def issues_by_row(self) -> dict[int, list[RowIssue]]:
        grouped: dict[int, list[RowIssue]] = defaultdict(list)
        for issue in self.issues:
            grouped[issue.row].append(issue)
        return dict(grouped)




def validate_manifest(
    uri: str,
    *,
    allowed_roots: list[str] | None = None,
    check_files: bool = True,
    mode: str = "exact",
    precision: str | None = None,
) -> Validation:
    """Validate every row of the manifest at `uri`.

    Relative paths resolve against the manifest's folder. A path must stay inside the
    manifest's folder or one of `allowed_roots`; anything else is refused. With
    `check_files`, referenced files must exist (their content is checked later, by
    normalization). `mode`: the batch's (the setting); rows in distilled mode (theirs or a
    'mode' cell) default to its 4 steps without guidance and refuse what it cannot honour. With
    the batch's `precision`, a row naming another precision is refused: a batch's generators load
    the model once, in one precision.
    """
    frame = read_manifest(uri)
    base = storage.parent(uri) if storage.is_remote(uri) else str(Path(uri).resolve().parent)
    roots = [_normalize_root(base)] + [_normalize_root(r) for r in (allowed_roots or [])]
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    ignored = [c for c in frame.columns if c not in known]

    issues: list[RowIssue] = []
    seen_ids: dict[str, int] = {}
    seen_outputs: dict[str, int] = {}
    checked: list[tuple[int, str | None, dict, list[RowIssue]]] = []

    for number, record in enumerate(frame.to_dict(orient="records"), start=1):
        row_issues, values = _check_row(number, record, base, roots, mode, precision)
        row_id = values["id"]
        if row_id and row_id in seen_ids:
            row_issues.append(
                RowIssue(
                    row=number, id=row_id, field="id", reason=f"duplicate id, already used by row {seen_ids[row_id]}"
                )
            )
        elif row_id:
            seen_ids[row_id] = number
        output = values["output"]
        if output and output in seen_outputs and not any(i.field == "id" for i in row_issues):
            row_issues.append(
                RowIssue(
                    row=number,
                    id=row_id,
                    field="output",
                    reason=f"output {output!r} already written by row {seen_outputs[output]}",
                )
            )
        elif output:
            seen_outputs.setdefault(output, number)
        checked.append((number, row_id, values, row_issues))

    if check_files:
        # Every row's files are checked, also rows with other problems: one pass reports all.
        wanted = [values[c] for _, _, values, _ in checked for c in PATH_COLUMNS if values.get(c)]
        wanted += [uri for _, _, values, _ in checked for uri in values.get("lora") or []]
        problems = _file_problems(wanted)
        for number, row_id, values, row_issues in checked:
            bad_paths = {i.field for i in row_issues}
            row_issues.extend(
                RowIssue(row=number, id=row_id, field=c, reason=problems[values[c]])
                for c in PATH_COLUMNS
                if values.get(c) and c not in bad_paths and values[c] in problems
            )
            missing = [u for u in values.get("lora") or [] if u in problems]
            if missing and "lora" not in bad_paths:
                row_issues.append(RowIssue(row=number, id=row_id, field="lora", reason=problems[missing[0]]))

    rows: list[ManifestRow] = []
    for number, _, values, row_issues in checked:
        if row_issues:
            issues.extend(row_issues)
        else:
            rows.append(ManifestRow(row=number, **values))

    issues.sort(key=lambda i: (i.row, i.field))
    return Validation(manifest=uri, rows=rows, issues=issues, total_rows=len(frame), ignored_columns=ignored)


def _check_row(
    number: int, record: dict[str, str], base: str, roots: list[str], batch_mode: str = "exact",
    batch_precision: str | None = None,
) -> tuple[list[RowIssue], dict]:
    """Check one row's cells; return its problems and the typed values."""
    # A NUL byte is damage, never data: the OS refuses it in a path and a script would carry it on.
    damaged = [c for c, cell in record.items() if "\x00" in cell]
    record = {c: "" if c in damaged else cell for c, cell in record.items()}
    row_id = record.get("id") or None
    issues: list[RowIssue] = []

    def fail(column: str, reason: str) -> None:
        issues.append(RowIssue(row=number, id=row_id, field=column, reason=reason))

    for column in damaged:
        fail(column, "holds a NUL byte (the manifest is damaged here); retype this cell")
    values: dict = {}
    if not row_id and "id" not in damaged:
        fail("id", "required value is empty")
    elif not ID_PATTERN.match(row_id):
        fail("id", "use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    values["id"] = row_id

    for column in PATH_COLUMNS:
        raw = record.get(column, "")
        if not raw:
            if column in REQUIRED_COLUMNS and column not in damaged:
                fail(column, "required value is empty")
            values[column] = None
            continue
        resolved, reason = _resolve_path(raw, base, roots)
        if reason:
            fail(column, reason)
            resolved = None  # never touch a refused path, not even to check it exists
        values[column] = resolved

    for column in TEMPLATE_COLUMNS:
        values[column] = _fill_template(record.get(column) or "", record, lambda reason, c=column: fail(c, reason))

    webhook = record.get("webhook") or None
    if webhook and not re.match(r"^https?://[^\s/]+", webhook):
        fail("webhook", f"{webhook!r} is not an http(s) URL")
    values["webhook"] = webhook

    language = (record.get("language") or "").lower() or None
    if language and not LANGUAGE_PATTERN.match(language):
        fail("language", f"{record['language']!r} is not a two-letter ISO 639-1 code such as 'en'")
    values["language"] = language

    resolution = record.get("resolution") or Resolution.P480.value
    try:
        values["resolution"] = Resolution(resolution.lower())
    except ValueError:
        fail("resolution", f"unknown resolution {resolution!r}; use 480p or 720p")

    _check_speed_and_lora(record, base, roots, values, fail)
    mode = (record.get("mode") or "").lower() or None
    if mode and mode not in MODES:
        fail("mode", f"unknown mode {record['mode']!r}; use {', '.join(MODES)}")
    values["mode"] = mode if mode in MODES else None
    distilled = (values["mode"] or batch_mode) == "distilled"
    precision = (record.get("precision") or "").lower() or None
    if precision and precision not in PRECISIONS:
        fail("precision", f"{record['precision']!r} is not a precision; use {' or '.join(PRECISIONS)}")
        precision = None
    elif precision and batch_precision and precision != batch_precision:
        fail("precision", f"{precision!r} is not the batch's precision {batch_precision!r}: a batch loads its model "
                          f"once, in one precision; run such rows as a batch of their own with --precision {precision}")
    values["precision"] = precision
    values["seed"] = _int_cell(record, "seed", DEFAULT_SEED, 0, 2**32 - 1, fail)
    values["steps"] = _int_cell(record, "steps", DISTILLED_STEPS if distilled else 40, 1, 200, fail)
    values["guidance"] = _float_cell(record, "guidance", 1.0 if distilled else 4.5, 0.0, 30.0, fail)
    if distilled:
        _check_distilled(values, fail)

    output = record.get("output") or (f"{row_id}.mp4" if row_id else "")
    out_path = PurePosixPath(output.replace("\\", "/"))
    if output and (out_path.is_absolute() or ".." in out_path.parts or "://" in output):
        fail("output", f"{output!r} must be a relative path inside the output folder")
    elif output and out_path.suffix.lower() != ".mp4":
        fail("output", f"{output!r} must end in .mp4")
    elif output and out_path.parts[0].lower() == layout.STATE_DIR:
        fail("output", f"{output!r} points into {layout.STATE_DIR}/, the batch's own records; choose another folder")
    values["output"] = str(out_path)
    return issues, values


def _check_distilled(values: dict, fail) -> None:
    """What a row in distilled mode (LiveAvatar's 4-step model, model/distilled.py) cannot have."""
    why = "distilled mode"
    if values["steps"] != DISTILLED_STEPS:
        fail("steps", f"{why} samples the {DISTILLED_STEPS} steps LiveAvatar was distilled to; leave steps empty")
    if values["guidance"] > 1.0:
        fail("guidance", f"{why} has no classifier-free guidance; leave guidance empty")
    if values.get("negative_prompt"):
        fail("negative_prompt", f"{why} has no classifier-free guidance, so no negative prompt")
    if values.get("preset") not in (None, "exact"):
        fail("preset", f"{why} samples its own 4 steps; speed presets apply to exact mode only")
    if values.get("lora"):
        fail("lora", f"{why} runs with LiveAvatar's LoRA only (setting distilled_lora)")
    if values.get("resolution") == Resolution.P720:
        fail("resolution", f"{why} at 720p needs a 139 GiB KV cache, more than one GPU holds; use 480p")


def _check_speed_and_lora(record: dict[str, str], base: str, roots: list[str], values: dict, fail) -> None:
    """The `preset`, `lora` and `lora_strength` cells; empty cells leave the batch's settings."""
    preset = (record.get("preset") or "").lower() or None
    if preset and preset not in PRESET_NAMES:
        fail("preset", f"unknown preset {record['preset']!r}; use {', '.join(PRESET_NAMES)}")
    values["preset"] = preset

    cell = record.get("lora") or ""
    loras: list[str] | None = None
    if cell.lower() == "none":
        loras = []  # this row without the batch's LoRAs
    elif cell:
        loras = []
        for raw in (part.strip() for part in cell.split(LIST_SEPARATOR)):
            if not raw:
                continue
            resolved, reason = _resolve_path(raw, base, roots)
            if reason:
                fail("lora", reason)
                continue
            loras.append(resolved)
    values["lora"] = loras

    cell = record.get("lora_strength") or ""
    strengths: list[float] | None = None
    if cell:
        try:
            strengths = [float(part) for part in cell.split(LIST_SEPARATOR) if part.strip()]
        except ValueError:
            strengths = None
        if not strengths or not all(-MAX_LORA_STRENGTH <= x <= MAX_LORA_STRENGTH for x in strengths):
            fail("lora_strength", f"{cell!r} is not a number from -{MAX_LORA_STRENGTH:g} to {MAX_LORA_STRENGTH:g} "
                                  f"(or one per LoRA, separated by '{LIST_SEPARATOR}')")  # fmt: skip
            strengths = None
        elif loras and len(strengths) not in (1, len(loras)):
            fail("lora_strength", f"{len(strengths)} strengths for {len(loras)} LoRAs: give one, or one per LoRA")
            strengths = None
    values["lora_strength"] = strengths


def _fill_template(text: str, record: dict[str, str], fail) -> str | None:
    """Fill `{{column}}` variables from the row's own cells (any column, known or not)."""
    unknown = sorted({m.group(1) for m in TEMPLATE_VARIABLE.finditer(text) if m.group(1).lower() not in record})
    if unknown:
        names = ", ".join("{{" + u + "}}" for u in unknown)
        fail(f"unknown template variable {names}; the manifest's columns are {', '.join(record)}")
        return text or None
    filled = TEMPLATE_VARIABLE.sub(lambda m: record[m.group(1).lower()], text)
    return filled.strip() or None


def _int_cell(record: dict, column: str, default: int, low: int, high: int, fail) -> int:
    raw = record.get(column, "")
    if not raw:
        return default
    try:
        value = int(float(raw)) if float(raw).is_integer() else None
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        fail(column, f"{raw!r} is not a whole number from {low} to {high}")
        return default
    return value


def _float_cell(record: dict, column: str, default: float, low: float, high: float, fail) -> float:
    raw = record.get(column, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        fail(column, f"{raw!r} is not a number from {low:g} to {high:g}")
        return default
    return value


def _normalize_root(root: str) -> str:
    if storage.is_remote(root):
        return root.rstrip("/") + "/"
    return str(Path(root).expanduser().resolve()) + "/"


def _resolve_path(raw: str, base: str, roots: list[str]) -> tuple[str, str | None]:
    """Resolve a manifest path against the manifest folder and check it stays inside a root.
    Any error the OS raises while resolving (a name too long, a link loop) is the reason, not an exception."""
    try:
        resolved = _resolve(raw, base)
    except (OSError, ValueError, RuntimeError) as exc:
        return raw, f"path {_shorten(raw)!r} cannot be used: {_os_reason(exc)}"
    if not any((resolved + "/").startswith(root) for root in roots):
        allowed = ", ".join(r.rstrip("/") for r in roots)
        return resolved, f"path {_shorten(raw)!r} resolves outside the allowed folders ({allowed})"
    return resolved, None


def _resolve(raw: str, base: str) -> str:
    if "://" in raw and storage.is_remote(raw):
        protocol, rest = raw.split("://", 1)
        return f"{protocol}://{posixpath.normpath(rest)}"
    if "://" in raw:
        raw = raw.split("://", 1)[1]  # file://media/a.wav is media/a.wav, relative to the manifest like any path
    if storage.is_remote(base):
        protocol, rest = base.split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(rest, raw))}"
    return str((Path(base) / Path(raw).expanduser()).resolve())


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:limit // 2]}…{text[-limit // 2:]} ({len(text)} characters)"






def _file_problems(uris: list[str]) -> dict[str, str]:
    """Why each of `uris` that is not a readable file is not (absent: it is one). Every error of the OS
    or a storage client becomes that path's reason: one row's path never stops the validation.
    Remote folders are listed once each instead of one request a file."""
    problems: dict[str, str] = {}
    remote_dirs: dict[str, list[str]] = defaultdict(list)
    for uri in set(uris):
        if storage.is_remote(uri):
            remote_dirs[storage.parent(uri)].append(uri)
            continue
        try:
            mode = os.stat(uri).st_mode
        except (FileNotFoundError, NotADirectoryError):
            problems[uri] = f"file not found: {_shorten(uri)}"
            continue
        except (OSError, ValueError) as exc:
            problems[uri] = f"{_shorten(uri)} cannot be read: {_os_reason(exc)}"
            continue
        if not stat.S_ISREG(mode):
            problems[uri] = f"{_shorten(uri)} is {_file_kind(mode)}, not a file"
        elif not os.access(uri, os.R_OK):
            problems[uri] = f"{_shorten(uri)} cannot be read: permission denied"
    for folder, members in remote_dirs.items():
        protocol = folder.split("://", 1)[0]
        try:
            fs, path = storage.filesystem(folder)
            listed = {f"{protocol}://{e['name']}": e.get("type") for e in fs.ls(path, detail=True, refresh=True)}
        except FileNotFoundError:
            listed = {}
        except Exception as exc:  # credentials, endpoint, network, a malformed bucket name: these rows only
            reason = storage.describe_access_error(folder, exc, "allowed_roots")
            problems.update(dict.fromkeys(members, reason))
            continue
        for uri in members:
            if uri not in listed:
                problems[uri] = f"file not found: {_shorten(uri)}"
            elif listed[uri] == "directory":
                problems[uri] = f"{_shorten(uri)} is a folder, not a file"
    return problems
