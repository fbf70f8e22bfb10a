"""Webhooks: tell another system that a batch or a row finished, signed and retried.

Every delivery is one HTTP POST of a JSON object with these headers:

    Content-Type:     application/json
    X-S2V-Event:      the payload's "event" (e.g. batch.completed, row.failed)
    X-S2V-Delivery:   a random id, the same on every retry of one delivery (receivers deduplicate on it)
    X-S2V-Timestamp:  Unix time in whole seconds when the delivery was signed
    X-S2V-Signature:  sha256=<hex HMAC-SHA256 over f"{timestamp}.{body}" keyed with the shared secret>
                      (only when a secret is configured)

`body` is the exact request body (UTF-8 bytes). A receiver recomputes the HMAC over the raw
body it received (not a re-serialized parse), compares in constant time, and rejects
timestamps outside a few minutes so a captured request cannot be replayed later:
`verify_signature` does all of that. This is the scheme GitHub and Stripe use, so the usual
receiver libraries and API gateways can check it.

Delivery never raises into the batch: a webhook receiver being down must not fail videos
that were rendered. Connection errors, timeouts, 429 and 5xx are retried (tenacity) with
exponential backoff (honouring a short Retry-After); other 4xx mean the request itself is wrong and are
not retried. The outcome is a `WebhookResult`, and a failed delivery logs one warning.
`send_webhook` blocks (it sleeps between attempts): call it from a worker thread in async code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from tasks import layout, storage
from tasks.records import RowResult, batch_outcome

log = logging.getLogger(__name__)

SIGNATURE_PREFIX = "sha256="
RETRY_AFTER_MAX_S = 60.0
"""Longest Retry-After we wait for; a receiver asking for more gets our own backoff instead."""


@dataclass(frozen=True)
class WebhookResult:
    """What happened to one delivery."""

    url: str
    event: str | None
    ok: bool
    attempts: int
    status: int | None = None
    """HTTP status of the last response (None when no response came)."""
    error: str | None = None
    """Why the delivery failed (None when it succeeded)."""
    delivery: str = ""


# ---------------------------------------------------------------------------------------------
# signing


def sign(secret: str, timestamp: str | int, body: bytes | str) -> str:
    """The X-S2V-Signature value for `body` sent at `timestamp`."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    message = str(timestamp).encode("ascii") + b"." + body
    return SIGNATURE_PREFIX + hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str,
    timestamp: str | int,
    body: bytes | str,
    signature: str,
    tolerance_s: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """True when `signature` is ours for `body` at `timestamp`, and `timestamp` is within `tolerance_s`
    of now (either way, to allow for clock skew). For receivers; constant-time comparison."""
    try:
        sent = int(str(timestamp))
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, sent, body), signature.strip())


# ---------------------------------------------------------------------------------------------
# delivery


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a numeric Retry-After header (the HTTP-date form is rare for webhooks; ignored)."""
    value = response.headers.get("Retry-After", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= RETRY_AFTER_MAX_S else None


class _Transient(Exception):
    """An attempt that may succeed later: no connection, a timeout, 429 or 5xx."""

    def __init__(self, error: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(error)
        self.error, self.status, self.retry_after = error, status, retry_after


def send_webhook(
    url: str,
    payload: dict,
    *,
    secret: str | None,
    attempts: int = 4,
    backoff_s: float = 1.0,
    timeout_s: float = 10,
) -> WebhookResult:
    """POST `payload` as JSON to `url`, signed with `secret` when one is given; retried (tenacity) up to
    `attempts` times in all with delays backoff_s, 2·backoff_s, 4·backoff_s, … (or a longer Retry-After).
    Never raises."""
    event = payload.get("event") if isinstance(payload, dict) else None
    delivery = uuid.uuid4().hex
    attempts = max(1, attempts)
    try:
        # default=str: a stray datetime or Path in a payload must not lose the notification.
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")
    except (TypeError, ValueError) as exc:
        return _failed(url, event, delivery, 0, None, f"payload is not JSON-serializable: {exc}")

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return max(backoff_s * 2 ** (state.attempt_number - 1), getattr(exc, "retry_after", None) or 0.0)

    retrying = Retrying(stop=stop_after_attempt(attempts), wait=wait, retry=retry_if_exception_type(_Transient),
                        reraise=True)
    with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
        try:
            response = retrying(_post, client, url, body, event, delivery, secret)
        except _Transient as exc:
            return _failed(url, event, delivery, retrying.statistics["attempt_number"], exc.status, exc.error)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            # A malformed URL will not get better by retrying (not a _Transient, so tried once).
            return _failed(url, event, delivery, 1, None, f"invalid webhook URL: {exc}")
        except Exception as exc:  # never into the batch: a notification is not worth a failed run
            return _failed(url, event, delivery, retrying.statistics["attempt_number"], None,
                           f"{type(exc).__name__}: {exc}")
    tried, status = retrying.statistics["attempt_number"], response.status_code
    if 200 <= status < 300:
        return WebhookResult(url=url, event=event, ok=True, attempts=tried, status=status, delivery=delivery)
    return _failed(url, event, delivery, tried, status,
                   f"HTTP {status}" + (f": {response.text[:200]}" if response.text else ""))


def _post(
    client: httpx.Client, url: str, body: bytes, event: str | None, delivery: str, secret: str | None
) -> httpx.Response:
    """One attempt; _Transient when it is worth another."""
    # Signed per attempt: a retry minutes later must still pass the receiver's replay window.
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "s2v-batch-webhook",
        "X-S2V-Delivery": delivery,
        "X-S2V-Timestamp": timestamp,
    }
    if event:
        headers["X-S2V-Event"] = str(event)
    if secret:
        headers["X-S2V-Signature"] = sign(secret, timestamp, body)
    try:
        response = client.post(url, content=body, headers=headers)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol):
        raise  # checked before TransportError, which UnsupportedProtocol subclasses
    except httpx.TransportError as exc:  # refused, DNS, TLS, timeouts, dropped connections
        raise _Transient(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc
    if _retryable_status(response.status_code):
        error = f"HTTP {response.status_code}" + (f": {response.text[:200]}" if response.text else "")
        raise _Transient(error, response.status_code, _retry_after(response))
    return response


def _failed(url: str, event: str | None, delivery: str, attempts: int, status: int | None, error: str) -> WebhookResult:
    noun = "attempt" if attempts == 1 else "attempts"
    log.warning("webhook %s to %s failed after %d %s: %s", event or "delivery", _redact(url), attempts, noun, error)
    return WebhookResult(
        url=url, event=event, ok=False, attempts=attempts, status=status, error=error, delivery=delivery
    )


def _redact(url: str) -> str:
    """Scheme, host and path only: webhook URLs often carry a token in the query or the userinfo."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else url.split("?")[0]
    except ValueError:
        return url.split("?")[0]


# ---------------------------------------------------------------------------------------------
# payloads


def _uri(out: str, relative: str | None) -> str | None:
    """Absolute URI of an output named relative to the output folder (report.json's convention)."""
    if not relative:
        return None
    if "://" in relative or relative.startswith("/"):
        return relative
    return storage.join(out, relative)


def row_payload(row_result: RowResult, out: str) -> dict[str, Any]:
    """`row.succeeded` / `row.failed` / `row.skipped` for one row of a batch writing to `out`."""
    r = row_result
    return {
        "event": f"row.{r.status}",
        "row": r.row,
        "id": r.id,
        "status": r.status,
        "error": r.error,
        "video": _uri(out, r.video),
        "captions": {fmt: _uri(out, path) for fmt, path in r.captions.items()},
        "duration_s": r.duration_s,
        "backend": r.backend,
        "clips": r.clips,
        "gpu_s": r.gpu_s,
        "cached": r.cached,
        "flags": list(r.flags),
        "output": out,
    }


def batch_payload(report: dict) -> dict[str, Any]:
    """`batch.completed` when every row succeeded or was skipped, else `batch.failed`; from the report
    dict the batch flow returns (report.json). `status` says how bad: succeeded, partial (some rows
    failed, some succeeded) or failed (none succeeded)."""
    out = str(report.get("output", ""))
    rows = list(report.get("rows", []))
    counts = dict(report.get("counts") or _count(rows))
    manifest_errors = list(report.get("manifest_errors", []))
    status = batch_outcome(counts, len(manifest_errors))
    return {
        "event": "batch.completed" if status == "succeeded" else "batch.failed",
        "status": status,
        "manifest": report.get("manifest"),
        "output": out,
        "report": layout.report_uri(out) if out else None,
        "backend": report.get("backend"),
        "started_at": report.get("started_at"),
        "finished_at": report.get("finished_at"),
        "counts": counts,
        "videos": [
            {
                "row": r.get("row"),
                "id": r.get("id"),
                "video": _uri(out, r.get("video")),
                "captions": {fmt: _uri(out, p) for fmt, p in (r.get("captions") or {}).items()},
            }
            for r in rows
            if r.get("status") == "succeeded"
        ],
        "errors": [
            {"row": r.get("row"), "id": r.get("id"), "error": r.get("error")}
            for r in rows
            if r.get("status") == "failed"
        ]
        + [{"row": None, "id": None, "error": e} for e in manifest_errors],
    }


def batch_error_payload(manifest: str, out: str, error: str) -> dict[str, Any]:
    """`batch.failed` for a batch that could not run at all (bad manifest, missing checkpoint, ...)."""
    return {
        "event": "batch.failed",
        "status": "error",
        "manifest": manifest,
        "output": out,
        "report": None,
        "counts": {"succeeded": 0, "failed": 0, "skipped": 0},
        "videos": [],
        "errors": [{"row": None, "id": None, "error": error}],
    }


def _count(rows: list[dict]) -> dict[str, int]:
    counts = {"succeeded": 0, "failed": 0, "skipped": 0}
    for r in rows:
        status = r.get("status")
        if status in counts:
            counts[status] += 1
    return counts
