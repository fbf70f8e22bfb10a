"""Webhooks against a real HTTP server on loopback: signatures, retries, give-up, never raising."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.notify import (
    batch_error_payload,
    batch_payload,
    row_payload,
    send_webhook,
    sign,
    verify_signature,
)
from tasks.records import Report, RowResult

SECRET = "s3cr3t-shared"


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes
    signature_ok: bool | None


@dataclass
class Receiver:
    """A webhook receiver: answers with the queued (status, headers, delay_s) replies, then 200."""

    url: str
    replies: list[tuple[int, dict[str, str], float]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            signature = self.headers.get("X-S2V-Signature")
            ok = None
            if signature is not None:
                ok = verify_signature(SECRET, self.headers.get("X-S2V-Timestamp", ""), body, signature)
            with state.lock:
                state.seen.append(Seen(self.path, dict(self.headers.items()), body, ok))
                status, headers, delay = state.replies.pop(0) if state.replies else (200, {}, 0.0)
            if delay:
                time.sleep(delay)
            reply = b'{"received": true}' if status < 300 else b"nope"
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/s2v?token=abc123"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _closed_port() -> int:
    """A loopback port nothing listens on: bound, then closed (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PAYLOAD = {"event": "row.succeeded", "id": "café-01", "video": "s3://team/videos/café-01.mp4"}


def test_delivery_is_json_signed_and_verifiable(receiver: Receiver) -> None:
    result = send_webhook(receiver.url, PAYLOAD, secret=SECRET, backoff_s=0.01)

    assert result.ok and result.attempts == 1 and result.status == 200 and result.error is None
    [req] = receiver.seen
    assert req.path == "/hooks/s2v?token=abc123"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["X-S2V-Event"] == "row.succeeded"
    assert req.headers["X-S2V-Delivery"] == result.delivery
    assert req.signature_ok is True
    assert json.loads(req.body) == PAYLOAD
    ts = req.headers["X-S2V-Timestamp"]
    assert req.headers["X-S2V-Signature"] == sign(SECRET, ts, req.body)
    # A receiver rejects another secret, a changed body and a replayed (old) timestamp.
    assert not verify_signature("other-secret", ts, req.body, req.headers["X-S2V-Signature"])
    assert not verify_signature(SECRET, ts, req.body + b" ", req.headers["X-S2V-Signature"])
    assert not verify_signature(SECRET, ts, req.body, req.headers["X-S2V-Signature"], now=int(ts) + 301)
    assert verify_signature(SECRET, ts, req.body, req.headers["X-S2V-Signature"], now=int(ts) + 299)
    assert not verify_signature(SECRET, "not-a-number", req.body, req.headers["X-S2V-Signature"])


def test_signature_matches_the_documented_scheme() -> None:
    import hashlib
    import hmac

    body = b'{"event":"batch.completed"}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k", 1700000000, body) == "sha256=" + expected
    assert verify_signature("k", "1700000000", body, "sha256=" + expected, now=1700000010)


def test_without_secret_no_signature_header(receiver: Receiver) -> None:
    result = send_webhook(receiver.url, PAYLOAD, secret=None)
    assert result.ok
    [req] = receiver.seen
    assert "X-S2V-Signature" not in req.headers and req.headers["X-S2V-Timestamp"].isdigit()


def test_503s_are_retried_with_one_delivery_id(receiver: Receiver) -> None:
    receiver.replies = [(503, {}, 0.0), (503, {}, 0.0)]
    result = send_webhook(receiver.url, PAYLOAD, secret=SECRET, attempts=4, backoff_s=0.01)

    assert result.ok and result.attempts == 3 and result.status == 200
    assert len(receiver.seen) == 3
    assert {r.headers["X-S2V-Delivery"] for r in receiver.seen} == {result.delivery}
    assert all(r.signature_ok for r in receiver.seen)


def test_429_is_retried_after_retry_after(receiver: Receiver) -> None:
    receiver.replies = [(429, {"Retry-After": "0"}, 0.0)]
    result = send_webhook(receiver.url, PAYLOAD, secret=SECRET, backoff_s=0.01)
    assert result.ok and result.attempts == 2 and len(receiver.seen) == 2


def test_gives_up_after_all_attempts_without_raising(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.replies = [(502, {}, 0.0)] * 3
    with caplog.at_level(logging.WARNING, logger="tasks.notify"):
        result = send_webhook(receiver.url, PAYLOAD, secret=SECRET, attempts=3, backoff_s=0.01)

    assert not result.ok and result.attempts == 3 and result.status == 502
    assert result.error is not None and result.error.startswith("HTTP 502")
    assert len(receiver.seen) == 3
    [record] = [r for r in caplog.records if r.name == "tasks.notify"]
    assert "failed after 3 attempts" in record.getMessage()
    assert "abc123" not in record.getMessage()  # the URL's token stays out of the log


def test_4xx_other_than_429_is_not_retried(receiver: Receiver) -> None:
    receiver.replies = [(400, {}, 0.0)]
    result = send_webhook(receiver.url, PAYLOAD, secret=SECRET, attempts=4, backoff_s=0.01)
    assert not result.ok and result.attempts == 1 and result.status == 400
    assert len(receiver.seen) == 1


def test_timeout_is_retried(receiver: Receiver) -> None:
    receiver.replies = [(200, {}, 1.0)]  # the first answer comes after the client gave up
    result = send_webhook(receiver.url, PAYLOAD, secret=SECRET, attempts=2, backoff_s=0.01, timeout_s=0.3)
    assert result.ok and result.attempts == 2
    assert len(receiver.seen) == 2


def test_unreachable_receiver_gives_a_failed_result() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/hook"
    result = send_webhook(url, PAYLOAD, secret=SECRET, attempts=2, backoff_s=0.01, timeout_s=2)
    assert not result.ok and result.attempts == 2 and result.status is None
    assert result.error is not None and "ConnectError" in result.error


def test_malformed_url_fails_once() -> None:
    for url in ("ftp://127.0.0.1/hook", "not a url"):
        result = send_webhook(url, PAYLOAD, secret=SECRET, attempts=4, backoff_s=0.01)
        assert not result.ok and result.attempts == 1
        assert result.error is not None and "invalid webhook URL" in result.error


# ---------------------------------------------------------------------------------------------
# payloads


def _rows() -> list[RowResult]:
    return [
        RowResult(row=1, id="intro", status="succeeded", video="intro.mp4",
                  captions={"srt": "intro.srt", "vtt": "intro.vtt"}, duration_s=12.5, gpu_s=3.0),
        RowResult(row=2, id="outro", status="failed", error="row 2 (id 'outro'), column 'audio': silent"),
        RowResult(row=3, id="fr", status="skipped", error="audio language fr"),
    ]  # fmt: skip


def _report(rows: list[RowResult], out: str, manifest_errors: list[str] | None = None) -> dict:
    report = Report(manifest="s3://team/batches/june.csv", output=out, backend="preview",
                    started_at="2026-06-01T00:00:00+00:00", finished_at="2026-06-01T01:00:00+00:00",
                    rows=rows, manifest_errors=manifest_errors or [])  # fmt: skip
    data = report.model_dump(mode="json")
    data["counts"] = report.counts
    return data


def test_row_payloads_name_event_status_and_absolute_uris() -> None:
    ok, bad, skipped = _rows()
    p = row_payload(ok, "s3://team/videos/june")
    assert p["event"] == "row.succeeded" and p["status"] == "succeeded" and p["error"] is None
    assert p["video"] == "s3://team/videos/june/intro.mp4"
    assert p["captions"] == {
        "srt": "s3://team/videos/june/intro.srt",
        "vtt": "s3://team/videos/june/intro.vtt",
    }

    local = row_payload(ok, "/data/out/june")
    assert local["video"] == "/data/out/june/intro.mp4"

    p = row_payload(bad, "s3://team/videos/june")
    assert p["event"] == "row.failed" and p["video"] is None and "column 'audio'" in p["error"]
    assert row_payload(skipped, "s3://x/y")["event"] == "row.skipped"
    json.dumps(p)  # plain JSON, ready to send


def test_batch_payload_completed_partial_and_failed() -> None:
    out = "s3://team/videos/june"
    ok, bad, skipped = _rows()

    done = batch_payload(_report([ok, skipped], out))
    assert done["event"] == "batch.completed" and done["status"] == "succeeded"
    assert done["counts"] == {"succeeded": 1, "failed": 0, "skipped": 1}
    assert done["report"] == "s3://team/videos/june/report.json"
    captions = {"srt": f"{out}/intro.srt", "vtt": f"{out}/intro.vtt"}
    assert done["videos"] == [{"row": 1, "id": "intro", "video": f"{out}/intro.mp4", "captions": captions}]
    assert done["errors"] == []

    partial = batch_payload(_report([ok, bad, skipped], out))
    assert partial["event"] == "batch.failed" and partial["status"] == "partial"
    assert partial["errors"] == [{"row": 2, "id": "outro", "error": bad.error}]

    failed = batch_payload(_report([bad], out, manifest_errors=["manifest: no 'audio' column"]))
    assert failed["event"] == "batch.failed" and failed["status"] == "failed"
    assert [e["error"] for e in failed["errors"]] == [bad.error, "manifest: no 'audio' column"]

    error = batch_error_payload("s3://team/batches/june.csv", out, "checkpoint missing: set S2V_CHECKPOINT")
    assert error["event"] == "batch.failed" and error["errors"][0]["error"].startswith("checkpoint missing")


def test_batch_payload_arrives_intact(receiver: Receiver) -> None:
    payload = batch_payload(_report(_rows(), "s3://team/videos/june"))
    result = send_webhook(receiver.url, payload, secret=SECRET)
    assert result.ok and result.event == "batch.failed"
    [req] = receiver.seen
    assert req.signature_ok and json.loads(req.body) == payload


def test_a_batch_that_cannot_run_sends_the_error_payload(receiver: Receiver, prefect_api, examples, tmp_path) -> None:
    """No report is written, so the payload points at none: a bad manifest, a checkpoint that is not there."""
    import asyncio

    from flows.batch import batch
    from flows.settings import BatchSettings

    (examples / "bad.csv").write_text("name\nx\n")
    cases = [
        (examples / "bad.csv", {}),
        (examples / "batch.csv", {"backend": "wan-s2v", "checkpoint": str(tmp_path / "none"), "pool": "on"}),
    ]
    for manifest, options in cases:
        receiver.seen.clear()
        out = tmp_path / manifest.stem
        settings = BatchSettings(webhook_url=receiver.url, webhook_secret=SECRET, **options)
        with pytest.raises(Exception) as failure:
            asyncio.run(batch(str(manifest), str(out), settings))
        [req] = receiver.seen
        assert req.signature_ok and req.headers["X-S2V-Event"] == "batch.failed"
        assert json.loads(req.body) == batch_error_payload(str(manifest), str(out), str(failure.value))
        assert json.loads(req.body)["report"] is None and not (out / "report.json").exists()
