"""Hostile input and interruption, driven through the command line as a user would (issue 16).

One row's path never stops a batch; a misshapen manifest is refused with one line; Ctrl-C (SIGINT to
the process group, as a terminal sends it), SIGINT to the process alone and SIGTERM end a run
promptly with exit 130 and one line, keeping finished rows and clips; a place the batch cannot write
is refused before any work; a full disk mid-run fails the affected row with the cause; two runs into
one output do not both run; the local Prefect API's start-up limit is named when it is hit.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from disks import Tmpfs, run_with_disks, unavailable

ROOT = Path(__file__).resolve().parents[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", **extra}


def s2v(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, **{"env": env(), **kwargs})


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


# ---------------------------------------------------------------- one row never stops the batch


@pytest.fixture
def hostile(examples: Path, tmp_path: Path) -> Path:
    """A manifest whose rows hold every kind of path the OS or a storage client refuses, and one good row."""
    os.mkfifo(examples / "media" / "pipe.wav")
    (examples / "media" / "voices").mkdir()
    rows = [
        "id,audio,image,script,output,notes",
        # A long note (a column the batch ignores) puts the NUL byte below past the first kilobytes (an early
        # one reads as a binary file).
        "good,media/thanks.flac,media/astronaut.jpg,\"Thank you for joining this course. See you in the next "
        "lesson!\",,\"" + "A note. " * 600 + "\"",
        f"long-name,media/{'a' * 300}.wav,media/astronaut.jpg,,,",
        "remote,s3://s2v-examples/media/welcome.wav,media/astronaut.jpg,,,",
        "nul,media/wel\x00come.wav,media/astronaut.jpg,,,",
        "folder,media/voices,media/astronaut.jpg,,,",
        "fifo,media/pipe.wav,media/astronaut.jpg,,,",
        "records,media/thanks.flac,media/astronaut.jpg,,.s2v/rows/x.mp4,",
    ]
    path = examples / "hostile.csv"
    path.write_bytes(("\n".join(rows) + "\n").encode())
    return path


def no_s3_credentials(tmp_path: Path) -> dict[str, str]:
    scrubbed = {k: v for k, v in env().items() if not k.startswith("AWS_")}
    return {**scrubbed, "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none")}


EXPECTED_REASONS = {
    2: "the name is too long for the file system",
    3: "S3 credentials are missing or wrong",
    4: "holds a NUL byte",
    5: "is a folder, not a file",
    6: "is a FIFO (named pipe), not a file",
    7: "points into .s2v/",
}


def test_validate_names_each_bad_row_and_exits_1_not_2(hostile: Path, tmp_path: Path) -> None:
    result = s2v("validate", str(hostile), "--allowed-root", "s3://s2v-examples", "--json",
                 env=no_s3_credentials(tmp_path), timeout=120)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert (report["rows"], report["valid"]) == (7, 1)
    reasons = {i["row"]: i["reason"] for i in report["issues"]}
    assert set(reasons) == set(EXPECTED_REASONS)
    for row, words in EXPECTED_REASONS.items():
        assert words in reasons[row], (row, reasons[row])


def test_run_keeps_going_past_bad_rows(hostile: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = s2v("run", str(hostile), "--out", str(out), "--allowed-root", "s3://s2v-examples",
                 env=no_s3_credentials(tmp_path))
    assert result.returncode == 1, result.stderr  # a partial batch: some rows failed, the good one ran
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"succeeded": 1, "failed": 6, "skipped": 0}
    by_row = {r["row"]: r for r in report["rows"]}
    assert by_row[1]["status"] == "succeeded" and (out / "good.mp4").exists()
    for row, words in EXPECTED_REASONS.items():
        assert words in by_row[row]["error"], (row, by_row[row]["error"])
    assert "Traceback" not in result.stderr


def test_a_row_longer_than_the_header_stops_the_manifest_in_one_line(examples: Path) -> None:
    path = examples / "shifted.csv"
    path.write_text("id,audio,image\nwelcome,media/welcome.wav,media/astronaut.jpg,\n"
                    "thanks,media/thanks.flac,media/astronaut.jpg,\n")
    for command in ("validate", "run"):
        result = s2v(command, str(path), *(("--out", str(examples / "out")) if command == "run" else ()), timeout=120)
        assert result.returncode == 2
        (line,) = error_lines(result.stderr)
        assert line == f"error: {path} line 2 has 4 fields but the header has 3 columns (a trailing comma, or a " \
                       "value with a comma that needs quotes?)"


def test_a_fifo_manifest_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "m.csv"
    os.mkfifo(fifo)
    result = s2v("validate", str(fifo), timeout=120)  # reading it would block for ever
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"error: manifest {fifo} is a FIFO (named pipe), not a CSV file"]


# ---------------------------------------------------------------- interruption


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Prefect home of this module's own: its local API's database tells how the interrupted runs ended."""
    return tmp_path_factory.mktemp("prefect-home")


def _interrupt(examples: Path, out: Path, home: Path, signum: int, *, group: bool) -> tuple[int, str, list[int]]:
    """Run the example batch, send `signum` once the first row is finished; (exit code, stderr, the run's
    child processes at that moment)."""
    run = subprocess.Popen([sys.executable, "-m", "flows", "run", str(examples / "batch.csv"), "--out", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env=env(PREFECT_HOME=str(home)), start_new_session=True)
    try:
        while not glob.glob(str(out / ".s2v" / "rows" / "*.json")):
            assert run.poll() is None, run.communicate()
            time.sleep(0.1)
        children = [c.pid for c in psutil.Process(run.pid).children(recursive=True)]
        if group:
            os.killpg(run.pid, signum)  # what a terminal's Ctrl-C does: every process of the job
        else:
            os.kill(run.pid, signum)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    return run.returncode, stderr, children


def _last_batch_state(home: Path) -> str:
    with sqlite3.connect(home / "prefect.db") as db:
        (state,) = db.execute("SELECT state_type FROM flow_run WHERE name NOT LIKE 'row %' "
                              "ORDER BY created DESC LIMIT 1").fetchone()
    return state


def _gone(pids: list[int], within_s: float = 30) -> list[int]:
    """Those of `pids` still running after `within_s` (none, when all ended)."""
    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + within_s
    alive = [p for p in pids if running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if running(p)]
    return alive


@pytest.mark.parametrize(("signum", "group"), [(signal.SIGINT, True), (signal.SIGINT, False), (signal.SIGTERM, False)],
                         ids=["ctrl-c-to-the-group", "sigint-to-the-process", "sigterm-to-the-process"])
def test_a_signal_ends_the_run_in_order(examples: Path, tmp_path: Path, prefect_home: Path, signum: int,
                                        group: bool) -> None:
    out = tmp_path / "out"
    code, stderr, children = _interrupt(examples, out, prefect_home, signum, group=group)
    name = signal.Signals(signum).name
    assert code == 130, stderr
    (line,) = [ln for ln in error_lines(stderr) if "interrupted" in ln]
    assert line == f"interrupted ({name}): finished rows and clips are kept; rerun to resume"
    for noise in ("Traceback", "Crash detected", "ERROR", "Error"):
        assert noise not in stderr
    finished = [Path(p).stem for p in glob.glob(str(out / ".s2v" / "rows" / "*.json"))]
    assert finished and all((out / f"{row}.mp4").exists() for row in finished)
    # The local API outlived the signal long enough to record the batch's end, then went with the run,
    # as did every other process the run had started.
    assert _last_batch_state(prefect_home) == "CRASHED"
    assert _gone(children) == []


def test_a_rerun_after_ctrl_c_resumes_and_clears_half_written_files(examples: Path, tmp_path: Path,
                                                                    prefect_home: Path) -> None:
    out = tmp_path / "out"
    code, _, _ = _interrupt(examples, out, prefect_home, signal.SIGINT, group=True)
    assert code == 130
    finished = {Path(p).stem for p in glob.glob(str(out / ".s2v" / "rows" / "*.json"))}
    # What a run killed mid-write leaves behind (atomic_local's temporary names).
    leftovers = [out / ".thanks.k3j4h5g6.part.mp4", out / ".s2v" / "work" / ".report.abcdefgh.part.json"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    result = s2v("run", str(examples / "batch.csv"), "--out", str(out), env=env(PREFECT_HOME=str(prefect_home)))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["succeeded"] == 3
    assert {r["id"] for r in report["rows"] if r.get("cached")} >= finished
    assert not any(p.exists() for p in leftovers)
    assert not list(out.rglob(".*.part*"))


# ---------------------------------------------------------------- the output place


def test_an_out_that_is_a_file_is_refused_before_any_work(examples: Path, tmp_path: Path) -> None:
    out = tmp_path / "videos"
    out.write_text("not a folder")
    result = s2v("run", str(examples / "batch.csv"), "--out", str(out), timeout=120)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"error: output folder {out}: {out} is a file, not a folder"]
    below = out / "sub"
    result = s2v("run", str(examples / "batch.csv"), "--out", str(below), timeout=120)
    assert result.returncode == 2 and f"error: output folder {below}: {out} is a file" in result.stderr


@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
@pytest.mark.parametrize(("disk", "cause"), [
    (dict(size_mb=4, read_only=True), "is on a read-only file system"),
    (dict(size_mb=8, fill_mb=8), "the disk is full (0.0 MB free at"),
], ids=["read-only", "full"])
def test_a_read_only_or_full_out_is_refused_before_any_work(examples: Path, tmp_path: Path, disk: dict,
                                                            cause: str) -> None:
    mount = tmp_path / "disk"
    out = mount / "out"
    result = run_with_disks([Tmpfs(mount, **disk)],
                            [sys.executable, "-m", "flows", "run", str(examples / "batch.csv"), "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: output folder {out}: ") and cause in line
    assert "Traceback" not in result.stderr and ".part" not in line


@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
def test_a_disk_filling_up_mid_run_fails_the_row_with_the_cause(examples: Path, tmp_path: Path) -> None:
    from media import _ffmpeg

    # Seven minutes of 48 kHz stereo: its normalized master alone (80 MB) does not fit in what is left.
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=220:sample_rate=48000:duration=420", "-af",
            "tremolo=f=4:d=0.9,volume=0.3", "-ac", "2", "-c:a", "pcm_s16le", str(examples / "media" / "long.wav"))
    manifest = examples / "disk.csv"
    manifest.write_text("id,audio,image\nthanks,media/thanks.flac,media/astronaut.jpg\n"
                        "long,media/long.wav,media/astronaut.jpg\n")
    mount = tmp_path / "disk"
    out = mount / "out"
    script = (f"import json, subprocess, sys\n"
              f"done = subprocess.run([sys.executable, '-m', 'flows', 'run', {str(manifest)!r}, '--out', {str(out)!r},"
              f" '--max-concurrent-rows', '1'], capture_output=True, text=True)\n"
              f"print(json.dumps({{'code': done.returncode, 'stdout': done.stdout, 'stderr': done.stderr,"
              f" 'report': open({str(out / 'report.json')!r}).read()}}))\n")
    result = run_with_disks([Tmpfs(mount, size_mb=80)], [sys.executable, "-c", script], capture_output=True,
                            text=True, cwd=ROOT, env=env(), timeout=600)
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["code"] == 1, done["stderr"]  # a partial batch: one row failed, the other ran
    report = json.loads(done["report"])
    rows = {r["id"]: r for r in report["rows"]}
    assert rows["thanks"]["status"] == "succeeded"
    assert rows["long"]["status"] == "failed"
    error = rows["long"]["error"]
    assert "no space left on device (" in error and "MB free at" in error and "Conversion failed" not in error
    assert "free some space and rerun" in error and ".part" not in error


def test_a_report_that_cannot_be_written_is_said_plainly(examples: Path, tmp_path: Path) -> None:
    manifest = examples / "one.csv"
    manifest.write_text("id,audio,image\nthanks,media/thanks.flac,media/astronaut.jpg\n")
    out = tmp_path / "out"
    (out / "report.json").mkdir(parents=True)  # in the way of the report
    result = s2v("run", str(manifest), "--out", str(out))
    assert result.returncode == 0, result.stderr
    (summary,) = [ln for ln in result.stdout.splitlines() if "could not write" in ln]
    assert summary.startswith("Completed: 1 succeeded") and " 0 failed, 0 skipped of 1 rows" in summary
    assert f"; could not write {out / 'report.json'}: " in summary
    assert "Is a directory" in summary
    assert (out / "thanks.mp4").exists() and (out / ".s2v" / "rows" / "thanks.json").exists()


# ---------------------------------------------------------------- two runs, one output


def test_a_second_run_into_the_same_output_stops_with_a_clear_message(examples: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "flows", "run", str(examples / "batch.csv"), "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env())
    try:
        lock = out / ".s2v" / "lock.json"
        while not (lock.exists() and lock.read_text().strip() not in ("", "{}")):
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        second = s2v("run", str(examples / "batch.csv"), "--out", str(out), timeout=300)
        assert second.returncode == 2
        (line,) = error_lines(second.stderr)
        assert line.startswith(f"error: another run is writing to {out}: process {first.pid} on host ")
        assert "Wait for it to finish or stop it" in line
        _, stderr = first.communicate(timeout=600)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["succeeded"] == 3 and not any(r.get("cached") for r in report["rows"])


def test_the_batch_flow_itself_takes_the_lock(examples: Path, tmp_path: Path, prefect_api: str) -> None:
    """Deployments and the pickup flow call the flow, not the command: the lock is the flow's."""
    from test_runlock import _hold_in_child

    from flows.batch import batch
    from flows.settings import BatchSettings
    from tasks.runlock import RunLocked

    out = tmp_path / "out"
    holder = _hold_in_child(out)
    try:
        with pytest.raises(RunLocked, match=f"process {holder.pid}"):
            asyncio.run(batch(str(examples / "batch.csv"), str(out), BatchSettings()))
    finally:
        holder.communicate("")
    assert not (out / "report.json").exists()


# ---------------------------------------------------------------- the local Prefect API


def test_a_local_api_start_that_times_out_names_the_setting(examples: Path, tmp_path: Path) -> None:
    home = tmp_path / "prefect"
    result = s2v("run", str(examples / "batch.csv"), "--out", str(tmp_path / "out"), timeout=300,
                 env=env(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0", PREFECT_HOME=str(home)))
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: the local Prefect API did not start within 0 s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=0)")
    assert "set PREFECT_API_URL" in line
    # The server that did not answer in time was stopped, not left running.
    leftover = [p for p in psutil.process_iter(["cmdline"]) if "flows.local_api" in " ".join(p.info["cmdline"] or [])
                and _environ(p).get("PREFECT_HOME") == str(home)]
    assert _gone([p.pid for p in leftover]) == []


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except psutil.Error:
        return {}


def test_the_local_api_start_up_limit_defaults_above_prefects() -> None:
    script = "from flows import local_api; print(local_api.startup_timeout())"
    unset = {k: v for k, v in env().items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=unset)
    assert plain.stdout.strip() == "90"
    chosen = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                            env=env(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="240"))
    assert chosen.stdout.strip() == "240"
