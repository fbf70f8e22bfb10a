"""Deployments on a real Prefect server (loopback, SQLite), run by a real worker, seen in the real UI.

Starts `prefect server start`, deploys prefect.yaml with `prefect deploy --all`, triggers the
on-demand deployment with a manifest of a good row, a flagged row, a row whose audio does not
say its script and an invalid row, lets a process worker run it, and checks what an operator
sees: the batch's name and honest state (Partial), each row run's state and message, warnings
in the logs, stage task run names, the batch's own artifacts (markdown with links and errors in
full, table, clip progress), the events, the webhook, `s2v-batch status` through the client,
the tag concurrency limit, nothing machine-specific stored in the deployments, and `nightly`
refusing to run without its Variables, then running with them. A second test renders on a
GPU pool of one (paced) worker and sees segments waiting in its queue as `Queued`. The pages
are opened in headless Chromium; the screenshots are kept under the test's tmp folder and
copied to out/test-artifacts/ (printed in the test log).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from media import mixed_manifest

from flows.report import batch_key, row_key
from tasks.notify import verify_signature

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "out" / "test-artifacts"
"""Where the screenshots are copied for a person to look at (also under each test's tmp folder)."""
PREFECT = str(Path(sys.executable).with_name("prefect"))
SECRET = "test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "S2V_PROJECT_DIR": str(ROOT),
    }
    log = open(home / "server.log", "w")  # noqa: SIM115 (kept open for the server's lifetime)
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=2).json() is True:
                break
        except (httpx.HTTPError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(1)
    try:
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


class Hooks(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hooks.received.append({
            "body": json.loads(body),
            "valid": verify_signature(SECRET, self.headers["X-S2V-Timestamp"], body,
                                      self.headers["X-S2V-Signature"]),
        })
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def cli(env: dict, *args: str, timeout: int = 300) -> str:
    result = subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def post(env: dict, path: str, body: dict) -> list[dict]:
    response = httpx.post(env["PREFECT_API_URL"] + path, json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def s2v(env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", *args], env={**env, "COLUMNS": "200"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def get(env: dict, path: str) -> dict:
    response = httpx.get(env["PREFECT_API_URL"] + path, timeout=30)
    response.raise_for_status()
    return response.json()


def test_deployment_run_on_a_real_server_and_ui(server: dict, tmp_path: Path) -> None:
    hooks = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    env = {**server, "S2V_WEBHOOK_URL": f"http://127.0.0.1:{hooks.server_port}/batch",
           "S2V_WEBHOOK_SECRET": SECRET}
    manifest = mixed_manifest(tmp_path / "examples")
    out = tmp_path / "out"

    cli(env, "work-pool", "create", "s2v-local", "--type", "process")
    cli(env, "concurrency-limit", "create", "s2v-normalize", "1")
    deployed = cli(env, "--no-prompt", "deploy", "--all")
    assert "batch/on-demand" in deployed and "pickup/nightly" in deployed
    # Nothing of the machine that deployed is stored: no parameters baked in, the folder resolved on the worker.
    deployments = {d["name"]: d for d in post(env, "/deployments/filter", {})}
    assert deployments["nightly"]["parameters"] == {} and deployments["on-demand"]["parameters"] == {}
    assert set(deployments["on-demand"]["parameter_openapi_schema"]["required"]) == {"manifest", "out"}
    assert deployments["on-demand"]["pull_steps"] == [{"flows.workdir.project_dir": {}}]

    params = {"manifest": str(manifest), "out": str(out),
              "settings": {"max_concurrent_rows": 3, "work_dir": str(tmp_path / "work")}}
    started = cli(env, "deployment", "run", "batch/on-demand", "--params", json.dumps(params))
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)

    # A process worker picks the run up, runs it and exits.
    cli(env, "worker", "start", "--pool", "s2v-local", "--run-once", timeout=600)

    # The batch: named after its manifest and date, Partial (a Completed state) with the counts.
    run = get(env, f"/flow_runs/{run_id}")
    assert re.fullmatch(r"mixed \d{4}-\d{2}-\d{2} \d{2}:\d{2}", run["name"]), run["name"]
    assert (run["state_type"], run["state_name"]) == ("COMPLETED", "Partial"), run["state"]
    assert run["state"]["message"] == "Partial: 2 succeeded (1 with warnings), 1 failed, 1 skipped of 4 rows"

    # Every row is a row run, the invalid one too, each state saying how it went and why.
    rows = {r["name"]: r for r in post(env, "/flow_runs/filter",
                                         {"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}})}
    assert {name: r["state_name"] for name, r in rows.items()} == {
        "row 1: welcome": "Completed", "row 2: noface": "Flagged", "row 3: wrongfile": "Skipped",
        "row 4: missing": "Invalid"}
    flagged = rows["row 2: noface"]["state"]["message"]
    assert flagged.startswith("2 warnings: image_no_face: no frontal face found") and "image_blurry" in flagged
    skipped = rows["row 3: wrongfile"]["state"]["message"]
    assert "skipped by mismatch_policy 'skip'" in skipped and "audio_not_english_or_wrong_file" in skipped
    assert rows["row 4: missing"]["state_type"] == "FAILED"
    assert "column 'audio': file not found" in rows["row 4: missing"]["state"]["message"]
    # The flagged row's warnings are warnings in its logs.
    logs = post(env, "/logs/filter", {"logs": {"flow_run_id": {"any_": [rows["row 2: noface"]["id"]]},
                                               "level": {"ge_": 30}}})
    assert any("image_no_face" in log["message"] and log["level"] == 30 for log in logs), logs

    # Stage task runs are named with their row; the tag limit s2v-normalize=1 held.
    tasks = post(env, "/task_runs/filter", {"flow_runs": {"id": {"any_": [r["id"] for r in rows.values()]}}})
    names = {t["name"] for t in tasks}
    assert {"normalize welcome", "speech welcome", "plan welcome", "stitch welcome", "normalize noface",
            "stitch noface", "normalize wrongfile", "speech wrongfile"} <= names, names
    assert "generate welcome segment 0" in names and not any("wrongfile segment" in n for n in names)
    normalize = sorted((datetime.fromisoformat(t["start_time"]), datetime.fromisoformat(t["end_time"]))
                       for t in tasks if t["name"].startswith("normalize "))
    assert len(normalize) == 3
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(normalize, normalize[1:], strict=False))

    # The batch's own artifacts: markdown with links and every warning and error in full, the table,
    # and each rendered row's clip progress (rendered in the flow process here).
    key = batch_key(str(manifest), str(out))
    artifacts = {a["key"]: a for a in post(env, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [
        run_id, *(r["id"] for r in rows.values())]}}}) if a["key"]}
    assert not [k for k in artifacts if k == "batch-report"]
    report_md = artifacts[key]["data"]
    assert f"[welcome.mp4]({(out / 'welcome.mp4').as_uri()})" in report_md
    assert "## Warnings" in report_md and "## Errors and skipped rows" in report_md
    report = json.loads((out / "report.json").read_text())
    shown = report_md.replace("\\", "")  # markdown escapes taken away: every error and warning, in full
    for row in report["rows"]:
        for text in filter(None, [row["error"], *row["flags"]]):
            assert text in shown, text
    table = json.loads(artifacts[f"{key}-table"]["data"])
    assert [r["status"] for r in table] == ["succeeded", "succeeded (2 warnings)", "skipped", "failed"]
    for row_id in ("welcome", "noface"):
        assert artifacts[row_key(key, row_id, "clips")]["data"] == 100.0

    # report.json: numbers kept to what they mean; the counts match the state.
    assert report["counts"] == {"succeeded": 2, "failed": 1, "skipped": 1}
    welcome = report["rows"][0]
    assert welcome["audio_qc"]["peak_dbfs"] == round(welcome["audio_qc"]["peak_dbfs"], 1)
    assert welcome["image_qc"]["sharpness"] == round(welcome["image_qc"]["sharpness"], 1)
    assert welcome["gpu_s"] == round(welcome["gpu_s"], 1) and welcome["duration_s"] == round(welcome["duration_s"], 3)

    # Events for Automations: each row's outcome and the batch's.
    expected = ["s2v.batch.partial", "s2v.row.failed", "s2v.row.skipped", "s2v.row.succeeded"]
    deadline = time.monotonic() + 60  # the server stores events in batches, a few seconds apart
    while True:
        events = httpx.post(env["PREFECT_API_URL"] + "/events/filter", timeout=30,
                            json={"filter": {"event": {"prefix": ["s2v."]}}, "limit": 50}).json()["events"]
        by_event: dict[str, list[dict]] = {}
        for e in events:
            by_event.setdefault(e["event"], []).append(e)
        if sorted(by_event) == expected or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert sorted(by_event) == expected
    (failed,) = by_event["s2v.row.failed"]
    assert failed["resource"]["prefect.resource.name"] == "missing" and "file not found" in failed["payload"]["error"]
    assert any(r["prefect.resource.id"] == f"prefect.flow-run.{run_id}" for r in failed["related"])

    # The webhook agrees with the state (partial), and so would the CLI's exit code (1).
    batch_hooks = [h for h in Hooks.received if h["body"]["event"].startswith("batch.")]
    assert len(batch_hooks) == 1 and batch_hooks[0]["valid"]
    assert (batch_hooks[0]["body"]["event"], batch_hooks[0]["body"]["status"]) == ("batch.failed", "partial")
    hooks.shutdown()

    # `s2v-batch status RUN_ID` reads the run through Prefect's client.
    status = s2v(server, "status", run_id)
    assert status.returncode == 0, status.stderr
    assert "Partial" in status.stdout and "Flagged" in status.stdout and "Invalid" in status.stdout
    assert "image_no_face" in status.stdout and "file not found" in status.stdout

    ui = f"http://127.0.0.1:{env['PREFECT_API_URL'].split(':')[2].split('/')[0]}"
    with Browser(tmp_path) as browser:
        browser.shoot("batch-run-partial", f"{ui}/runs/flow-run/{run_id}", [run["name"], "Partial"])
        browser.shoot("row-run-flagged", f"{ui}/runs/flow-run/{rows['row 2: noface']['id']}",
                      ["row 2: noface", "Flagged"])
        browser.shoot("row-run-invalid", f"{ui}/runs/flow-run/{rows['row 4: missing']['id']}",
                      ["row 4: missing", "Invalid"])
        browser.shoot("batch-report-markdown", f"{ui}/artifacts/artifact/{artifacts[key]['id']}",
                      ["Warnings", "image_no_face", "file not found"])
        browser.shoot("batch-report-table", f"{ui}/artifacts/artifact/{artifacts[f'{key}-table']['id']}",
                      ["welcome", "noface", "skipped", "failed"])

    # `nightly` without its Variables refuses to run, naming them; with them it runs.
    def run_nightly() -> dict:
        started = cli(server, "deployment", "run", "pickup/nightly")
        nightly_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
        cli(server, "worker", "start", "--pool", "s2v-local", "--run-once", timeout=600)
        return get(server, f"/flow_runs/{nightly_id}")

    refused = run_nightly()
    assert refused["state_type"] == "FAILED"
    assert "s2v_pickup_prefix is not set" in refused["state"]["message"]
    assert "s2v_pickup_out is not set" in refused["state"]["message"]
    drop = tmp_path / "drop"
    shutil.copytree(ROOT / "manifests" / "examples" / "media", drop / "media")
    (drop / "monday.csv").write_text("id,audio,image\nthanks,media/thanks.flac,media/astronaut.jpg\n")
    cli(server, "variable", "set", "s2v_pickup_prefix", str(drop))
    cli(server, "variable", "set", "s2v_pickup_out", str(tmp_path / "nightly"))
    ran = run_nightly()
    assert ran["state_type"] == "COMPLETED", ran["state"]
    assert (tmp_path / "nightly" / "monday" / "thanks.mp4").exists()


def test_segments_waiting_for_the_pool_show_as_queued(server: dict, tmp_path: Path) -> None:
    """One GPU worker (the paced generator), three rows: while one segment renders the others wait in the
    pool's queue, and their generate task runs say so (Pending, named Queued) in the API, the UI and
    `s2v-batch status`; the batch ends Completed and the command exits 0."""
    folder = tmp_path / "queue"
    shutil.copytree(ROOT / "manifests" / "examples", folder)
    manifest = folder / "queue.csv"
    shutil.copyfile(folder / "batch.csv", manifest)
    # Clips slow enough that a waiting segment is still waiting once `status` and a browser have looked
    # (each takes several seconds on a loaded machine).
    options = {"clip_s": 8.0}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows", "run", str(manifest), "--out", str(tmp_path / "out"), "--pool", "on",
         "--pool-workers", "1", "--generator-factory", "tests.paced:PacedGenerator", "--generator-options",
         json.dumps(options), "--infer-frames", "40", "--max-concurrent-rows", "3"],
        env={**server, "COLUMNS": "200"}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 400
        queued: list[dict] = []
        while not queued:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no segment was seen waiting in the pool's queue"
            time.sleep(1)
            queued = [t for t in post(server, "/task_runs/filter", {"task_runs": {"name": {"like_": "generate"}}})
                      if t["state_name"] == "Queued"]
        assert queued[0]["state_type"] == "PENDING" and queued[0]["name"].startswith("generate ")
        (batch_run,) = post(server, "/flow_runs/filter", {"flow_runs": {"name": {"like_": "queue "}}})
        status = s2v(server, "status", batch_run["id"])
        assert status.returncode == 0 and "(Queued)" in status.stdout, status.stdout + status.stderr
        ui = f"http://127.0.0.1:{server['PREFECT_API_URL'].split(':')[2].split('/')[0]}"
        with Browser(tmp_path) as browser:
            # Asked again once the browser is up (its start takes seconds on a loaded machine), and the
            # segment queued last: the one queued first may start rendering before the page is drawn.
            waiting = [t for t in post(server, "/task_runs/filter", {"task_runs": {"name": {"like_": "generate"}}})
                       if t["state_name"] == "Queued"]  # fmt: skip
            assert waiting, "no segment was still waiting once the browser was up"
            last = max(waiting, key=lambda t: t["created"])
            browser.shoot("generate-task-queued", f"{ui}/runs/task-run/{last['id']}", [last["name"], "Queued"])
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Completed: 3 succeeded" in stdout
    # The segment seen waiting went Queued -> Running -> Completed (one the idle worker took at once is
    # never Queued); every generate task run ended Completed.
    history = [s["name"] for s in get(server, f"/task_run_states/?task_run_id={queued[0]['id']}")]
    assert "Queued" in history and "Running" in history[history.index("Queued"):], history
    assert history[-1] == "Completed", history
    generate = post(server, "/task_runs/filter", {"task_runs": {"name": {"like_": "generate"}},
                                                  "flow_runs": {"name": {"like_": "row "}}})
    assert generate and all(t["state_name"] == "Completed" for t in generate), [t["state_name"] for t in generate]


class Browser:
    """Headless Chromium keeping screenshots under `folder` and out/test-artifacts/."""

    def __init__(self, folder: Path):
        self.folder = folder / "screenshots"

    def __enter__(self) -> Browser:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        options = Options()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1400,1000"):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                                       options=options)
        self.folder.mkdir(parents=True, exist_ok=True)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return self

    def shoot(self, name: str, url: str, words: list[str]) -> Path:
        """Open `url`, wait until the page shows every one of `words`, keep a screenshot."""
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.get(url)
        WebDriverWait(self.driver, 60).until(
            lambda d: all(w in d.find_element("tag name", "body").text for w in words))
        time.sleep(1)  # let the page finish drawing after its text arrived
        path = self.folder / f"{name}.png"
        self.driver.save_screenshot(str(path))
        shutil.copyfile(path, SCREENSHOTS / path.name)
        print(f"screenshot {name}: {path} (copy: {SCREENSHOTS / path.name})")
        return path

    def __exit__(self, *exc) -> None:
        self.driver.quit()
