"""The batch flow end to end on a real (ephemeral) Prefect API, real media and a real S3 server."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.batch import batch
from flows.settings import BatchSettings
from flows.states import BatchFailed

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]
ROOT = Path(__file__).resolve().parents[1]




def ffprobe(path: Path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def check_video(path: Path) -> None:
    """16 fps H.264 with an audio stream, video as long as the audio within one frame."""
    info = ffprobe(path)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    audio = next(s for s in info["streams"] if s["codec_type"] == "audio")
    assert video["codec_name"] == "h264" and video["pix_fmt"] == "yuv420p"
    assert video["r_frame_rate"] == "16/1"
    assert audio["codec_name"] == "aac"
    assert abs(float(video["duration"]) - float(audio["duration"])) <= 1 / 16 + 1e-3


def make_bad_inputs(folder: Path) -> None:
    rate = 16000
    with wave.open(str(folder / "silent.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(rate * 2, dtype=np.int16).tobytes())
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.wav").write_text("this is a text file, not audio\n")
    Image.new("RGB", (200, 300), "gray").save(folder / "small.png")


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> tuple[Path, dict]:
    """The example rows plus one row for each kind of bad input, run once for the whole module."""
    folder = tmp_path_factory.mktemp("mixed")
    shutil.copytree(ROOT / "manifests" / "examples", folder, dirs_exist_ok=True)
    make_bad_inputs(folder / "media")
    lines = (folder / "batch.csv").read_text().strip().splitlines()
    lines += [
        "silent,media/silent.wav,media/astronaut.jpg,,,,",
        "empty,media/empty.wav,media/astronaut.jpg,,,,",
        "notaudio,media/notes.wav,media/astronaut.jpg,,,,",
        "notimage,media/welcome.wav,media/welcome.wav,,,,",
        "small,media/welcome.wav,media/small.png,,,,",
        "missing,media/gone.wav,media/astronaut.jpg,,,,",
        "welcome,media/welcome.wav,media/astronaut.jpg,,,,",
        "hd,media/welcome.wav,media/astronaut.jpg,,,1080p,",
        "escape,../../etc/passwd,media/astronaut.jpg,,,,",
    ]
    (folder / "mixed.csv").write_text("\n".join(lines) + "\n")
    out = folder / "out"
    report = asyncio.run(batch(str(folder / "mixed.csv"), str(out), BatchSettings(max_concurrent_rows=2)))
    return out, report


def test_good_rows_become_videos_with_captions(mixed_run) -> None:
    out, report = mixed_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["rows"] == report["rows"]
    good = {r["id"]: r for r in report["rows"] if r["status"] == "succeeded"}
    assert set(good) == {"welcome", "safety", "thanks"}
    for row in good.values():
        assert row["backend"] == "preview"
        video = out / row["video"]
        assert video.name == f"{row['id']}.mp4"
        check_video(video)
        srt = (out / row["captions"]["srt"]).read_text()
        vtt = (out / row["captions"]["vtt"]).read_text()
        assert srt.startswith("1\n") and " --> " in srt
        assert vtt.startswith("WEBVTT")
        assert row["audio_qc"]["source_sample_rate"] > 0 and row["image_qc"]["face_found"] is True
    # No temporary files are left where the deliverables are.
    assert not [p for p in out.iterdir() if ".part" in p.name]


def test_each_bad_row_fails_alone_with_a_reason(mixed_run) -> None:
    _, report = mixed_run
    failed = {r["row"]: r["error"] for r in report["rows"] if r["status"] == "failed"}
    expected = {
        4: ("'silent'", "column 'audio'", "silent"),
        5: ("'empty'", "column 'audio'", ""),
        6: ("'notaudio'", "column 'audio'", ""),
        7: ("'notimage'", "column 'image'", ""),
        8: ("'small'", "column 'image'", "256"),
        9: ("'missing'", "column 'audio'", "file not found"),
        10: ("'welcome'", "column 'id'", "duplicate id"),
        11: ("'hd'", "column 'resolution'", "1080p"),
        12: ("'escape'", "column 'audio'", "outside the allowed folders"),
    }
    assert set(failed) == set(expected)
    for number, parts in expected.items():
        assert failed[number].startswith(f"row {number} (id {parts[0]})"), failed[number]
        for part in parts[1:]:
            assert part in failed[number], failed[number]
    assert report["counts"] == {"succeeded": 3, "failed": 9, "skipped": 0}


def test_rerun_skips_finished_rows(mixed_run, tmp_path) -> None:
    out, first = mixed_run
    folder = out.parent
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    report = asyncio.run(batch(str(folder / "mixed.csv"), str(out), BatchSettings()))
    cached = [r for r in report["rows"] if r.get("cached")]
    assert {r["id"] for r in cached} == {"welcome", "safety", "thanks"}
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == before
    # A changed cell makes its row run again.
    manifest = (folder / "mixed.csv").read_text().replace("A teacher smiling", "A teacher waving")
    (folder / "mixed2.csv").write_text(manifest)
    report = asyncio.run(batch(str(folder / "mixed2.csv"), str(out), BatchSettings()))
    redone = {r["id"] for r in report["rows"] if r["status"] == "succeeded" and not r.get("cached")}
    assert redone == {"thanks"}


def test_changing_the_aligner_redoes_finished_rows(mixed_run, tmp_path) -> None:
    out, _ = mixed_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("work"))  # the markers and videos, a fresh work folder
    manifest = str(out.parent / "mixed.csv")
    same = asyncio.run(batch(manifest, str(copy), BatchSettings()))
    assert {"welcome", "safety"} <= {r["id"] for r in same["rows"] if r.get("cached")}  # 'thanks' may be rerun
    for setting in ("alignment_model", "whisper_model"):
        with pytest.raises(BatchFailed) as failed:  # every row failed: the batch is Failed, with its report
            asyncio.run(batch(manifest, str(copy), BatchSettings(**{setting: str(tmp_path / "no-model")})))
        report = failed.value.report
        rows = {r["id"]: r for r in report["rows"] if r["row"] <= 3}
        assert not any(r.get("cached") for r in report["rows"]), setting
        # The row ran again and reached the new aligner, which is not there.
        assert rows["welcome"]["status"] == "failed" and "stage 'speech'" in rows["welcome"]["error"], setting


def test_s3_manifest_and_output(s3, tmp_path) -> None:
    report = asyncio.run(batch("s3://s2v-examples/batch.csv", "s3://s2v-examples/out",
                               BatchSettings(work_dir=str(tmp_path / "work"))))
    assert report["counts"]["succeeded"] == 3
    for row in report["rows"]:
        assert s3.exists(f"s2v-examples/out/{row['video']}")
        assert s3.exists(f"s2v-examples/out/{row['captions']['vtt']}")
    local = tmp_path / "welcome.mp4"
    s3.get_file("s2v-examples/out/welcome.mp4", str(local))
    check_video(local)
    stored = json.loads(s3.cat_file("s2v-examples/out/report.json"))
    assert [r["status"] for r in stored["rows"]] == ["succeeded"] * 3


def test_cli_exit_codes(examples: Path, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "flows", ]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\x00\x01binary")
    result = subprocess.run([*cli, "run", str(bad), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "is not a CSV file" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([*cli, "run", str(examples / "batch.csv"), "--out", str(tmp_path / "o"),
                             "--backend", "wan-s2v"], capture_output=True, text=True)
    assert result.returncode == 2 and "needs a checkpoint" in result.stderr
    broken = examples / "broken.csv"
    broken.write_text("id,audio,image\na,media/welcome.wav,media/none.png\n")
    result = subprocess.run([*cli, "validate", str(broken)], capture_output=True, text=True)
    assert result.returncode == 1 and "file not found" in result.stdout


def test_status_reads_the_output_folder(mixed_run) -> None:
    from tasks.status import batch_status

    out, _ = mixed_run
    rows = {r.id: r for r in batch_status(str(out))}
    assert rows["welcome"].state == "succeeded" and rows["welcome"].clips_done == rows["welcome"].clips >= 1
    assert rows["silent"].state == "failed" and "silent" in rows["silent"].error
    result = subprocess.run([sys.executable, "-m", "flows", "status", str(out)], capture_output=True, text=True)
    assert result.returncode == 0 and "succeeded" in result.stdout and "GPU hours used" in result.stdout


def test_status_counts_planned_clips(mixed_run) -> None:
    from tasks.records import Plan

    out, _ = mixed_run
    plan = Plan.model_validate_json((out / ".s2v" / "work" / "welcome" / "plan.json").read_text())
    assert plan.total_clips >= 1 and plan.segments[0].start_sample == 0


def test_failure_notifications(examples: Path, tmp_path: Path) -> None:
    """A batch that cannot run tells the batch webhook; a failed row tells its own webhook; both signed."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tasks.notify import verify_signature

    received: list[tuple[str, dict, bool]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            ok = verify_signature("s3cret", self.headers["X-S2V-Timestamp"], body, self.headers["X-S2V-Signature"])
            received.append((self.path, json.loads(body), ok))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    settings = BatchSettings(webhook_url=f"{base}/batch", webhook_secret="s3cret", work_dir=str(tmp_path / "w"))
    try:
        (examples / "bad.csv").write_text("name\nx\n")
        with pytest.raises(Exception, match="lacks required column"):
            asyncio.run(batch(str(examples / "bad.csv"), str(tmp_path / "o1"), settings))
        (examples / "rows.csv").write_text(
            "id,audio,image,webhook\n"
            f"good,media/thanks.flac,media/astronaut.jpg,{base}/row\n"
            f"bad,media/astronaut.jpg,media/astronaut.jpg,{base}/row\n"
        )
        report = asyncio.run(batch(str(examples / "rows.csv"), str(tmp_path / "o2"), settings))
    finally:
        server.shutdown()
    assert report["counts"] == {"succeeded": 1, "failed": 1, "skipped": 0}
    assert all(ok for _, _, ok in received)
    events = sorted((path, body["event"]) for path, body, _ in received)
    assert events == [("/batch", "batch.failed"), ("/batch", "batch.failed"), ("/row", "row.failed"),
                      ("/row", "row.succeeded")]
    by_event = {body["event"]: body for path, body, _ in received if path == "/row"}
    assert by_event["row.failed"]["error"].startswith("row 2 (id 'bad'), column 'audio'")
    assert by_event["row.succeeded"]["video"].endswith("o2/good.mp4")
    batch_events = [body for path, body, _ in received if path == "/batch"]
    assert [b["event"] for b in batch_events] == ["batch.failed", "batch.failed"]
    assert "lacks required column" in json.dumps(batch_events[0])
    assert batch_events[1]["counts"] == {"succeeded": 1, "failed": 1, "skipped": 0}
