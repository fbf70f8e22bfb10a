"""Reading a manifest: the CSV file (local or s3://) into a DataFrame of stripped strings.

Everything that makes the file as a whole unusable is found here and raised as one
`ManifestError`: not a regular file, not UTF-8, binary, a repeated column, a line with more
fields than the header, a required column missing, no data rows. Checking each row's cells
is `tasks.manifest`'s job.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import stat

import pandas as pd

from tasks import storage

REQUIRED_COLUMNS = ("id", "audio", "image")


class ManifestError(Exception):
    """The manifest as a whole cannot be used; the batch stops before any work."""


def read_manifest(uri: str) -> pd.DataFrame:
    """Read a manifest into a DataFrame of strings (empty cells are '').

    Raises ManifestError with one clear message when the file is missing, is not a regular
    file, is not CSV, has no data rows, lacks a required column, repeats a column or has
    rows with more fields than the header.
    """
    if not storage.is_remote(uri):
        _check_manifest_file(uri)
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {uri}") from None
    except Exception as exc:  # permissions, S3 credentials, network: one message, no traceback
        raise ManifestError(storage.describe_access_error(uri, exc, "the manifest path")) from None
    if b"\x00" in raw[:4096]:
        raise ManifestError(f"{uri} is not a CSV file (it looks binary)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{uri} is not a UTF-8 CSV file ({exc.reason} at byte {exc.start})") from None
    header = _check_shape(uri, text)
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            dtype=str,
            keep_default_na=False,
            skipinitialspace=True,
            skip_blank_lines=True,
            quoting=csv.QUOTE_MINIMAL,
            index_col=False,  # never take the first column as the index (_check_shape refused extra fields)
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as exc:
        raise ManifestError(f"{uri} is not a valid CSV file: {str(exc).strip()}") from None
    # The header as written: pandas renames a repeated column ("script.1"), which would hide it.
    frame.columns = header
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        found = ", ".join(frame.columns[:12]) or "none"
        raise ManifestError(
            f"{uri} lacks required column(s) {', '.join(missing)} "
            f"(found: {found}); a manifest needs a header row with at least id, audio, image"
        )
    if frame.empty:
        raise ManifestError(f"{uri} has a header but no data rows")
    return frame.apply(lambda col: col.str.strip())


def _check_manifest_file(path: str) -> None:
    """A local manifest must be a regular file: reading a FIFO would wait for a writer forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"manifest {path!r} cannot be read: {_os_reason(exc)}") from None
    if not stat.S_ISREG(mode):
        raise ManifestError(f"manifest {path} is {_file_kind(mode)}, not a CSV file")


def _check_shape(uri: str, text: str) -> list[str]:
    """The header's column names (stripped, lower case); ManifestError for a repeated column or a
    line with more fields than the header. pandas would read a file whose every line has one field
    more as having an index column, shifting every value into the wrong column; a line naming the
    line and the count is the honest answer."""
    reader = csv.reader(io.StringIO(text), skipinitialspace=True)
    header: list[str] | None = None
    while True:
        try:
            record = next(reader, None)
        except csv.Error as exc:
            raise ManifestError(f"{uri} is not a valid CSV file: line {reader.line_num}: {exc}") from None
        if record is None:
            break
        if not record:  # blank line
            continue
        if header is None:
            header = [c.strip().lower() for c in record]
            duplicated = sorted({c for c in header if header.count(c) > 1})
            if duplicated:
                raise ManifestError(f"{uri} has duplicate column(s): {', '.join(duplicated)} "
                                    "(each column may appear once in the header)")
        elif len(record) > len(header):
            raise ManifestError(
                f"{uri} line {reader.line_num} has {len(record)} fields but the header has {len(header)} columns "
                "(a trailing comma, or a value with a comma that needs quotes?)"
            )
    if header is None:
        raise ManifestError(f"{uri} is empty: a manifest needs a header row with at least id, audio, image")
    return header


def _os_reason(exc: BaseException) -> str:
    """What went wrong, without the path (the message names it once, shortened)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return "the name is too long for the file system"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    if isinstance(exc, ValueError) and "null" in str(exc):
        return "it holds a NUL byte"
    return f"{type(exc).__name__}: {exc}"


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")
