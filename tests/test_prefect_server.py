"""Deployments on a real Prefect server (loopback, SQLite), run by a real worker, seen in the real UI.

Starts `prefect server start`, deploys prefect.yaml with `prefect deploy --all`, triggers the
on-demand deployment through the API, lets a process worker run it, checks the flow run,
its row subflows, their task runs, the report artifact, the tag concurrency limit and the
webhook, then opens the run and the report in headless Chromium and keeps screenshots.
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

from tasks.notify import verify_signature

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "out" / "test-artifacts"
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


def test_deployment_run_on_a_real_server_and_ui(server: dict, tmp_path: Path) -> None:
    hooks = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    env = {**server, "S2V_WEBHOOK_URL": f"http://127.0.0.1:{hooks.server_port}/batch",
           "S2V_WEBHOOK_SECRET": SECRET, "S2V_PICKUP_PREFIX": str(tmp_path / "drop"),
           "S2V_PICKUP_OUT": str(tmp_path / "nightly")}
    examples = tmp_path / "examples"
    shutil.copytree(ROOT / "manifests" / "examples", examples)
    out = tmp_path / "out"

    cli(env, "work-pool", "create", "s2v-local", "--type", "process")
    cli(env, "concurrency-limit", "create", "s2v-normalize", "1")
    deployed = cli(env, "--no-prompt", "deploy", "--all")
    assert "batch/on-demand" in deployed and "pickup/nightly" in deployed
    params = {"manifest": str(examples / "batch.csv"), "out": str(out),
              "settings": {"max_concurrent_rows": 3, "work_dir": str(tmp_path / "work")}}
    started = cli(env, "deployment", "run", "batch/on-demand", "--params", json.dumps(params))
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)

    # A process worker picks the run up, runs it and exits.
    cli(env, "worker", "start", "--pool", "s2v-local", "--run-once", timeout=600)

    run = httpx.get(f"{env['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=30).json()
    assert run["state_type"] == "COMPLETED", run["state"]
    rows = post(env, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}})
    assert sorted(r["name"] for r in rows) == ["row 1: welcome", "row 2: safety", "row 3: thanks"]
    assert all(r["state_type"] == "COMPLETED" for r in rows)
    tasks = post(env, "/task_runs/filter", {"flow_runs": {"id": {"any_": [r["id"] for r in rows]}}})
    by_name: dict[str, list[dict]] = {}
    for t in tasks:
        assert t["state_type"] == "COMPLETED", t["name"]
        by_name.setdefault(t["name"].split("-")[0].split(" ")[0], []).append(t)
    assert {k: len(v) for k, v in by_name.items() if k in ("normalize", "speech", "plan", "stitch")} == {
        "normalize": 3, "speech": 3, "plan": 3, "stitch": 3}
    assert len(by_name["generate"]) >= 3

    # The tag limit s2v-normalize=1 held: no two normalize runs overlapped, although 3 rows ran at once.
    spans = sorted((datetime.fromisoformat(t["start_time"]), datetime.fromisoformat(t["end_time"]))
                   for t in by_name["normalize"])
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))

    artifacts = post(env, "/artifacts/filter", {"artifacts": {"key": {"any_": ["batch-report"]},
                                                              "flow_run_id": {"any_": [run_id]}}})
    (artifact,) = artifacts
    table = json.loads(artifact["data"]) if isinstance(artifact["data"], str) else artifact["data"]
    assert [r["status"] for r in table] == ["succeeded"] * 3

    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["succeeded"] == 3
    batch_hooks = [h for h in Hooks.received if h["body"]["event"].startswith("batch.")]
    assert len(batch_hooks) == 1 and batch_hooks[0]["valid"] and batch_hooks[0]["body"]["event"] == "batch.completed"
    hooks.shutdown()

    ui = f"http://127.0.0.1:{env['PREFECT_API_URL'].split(':')[2].split('/')[0]}"
    screenshot_run_and_report(f"{ui}/runs/flow-run/{run_id}", f"{ui}/artifacts/artifact/{artifact['id']}",
                              run["name"])


def screenshot_run_and_report(run_url: str, artifact_url: str, run_name: str) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=options)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        driver.get(run_url)
        WebDriverWait(driver, 60).until(
            lambda d: run_name in d.find_element("tag name", "body").text
            and "Completed" in d.find_element("tag name", "body").text
        )
        driver.save_screenshot(str(SCREENSHOTS / "prefect-flow-run.png"))
        driver.get(artifact_url)
        WebDriverWait(driver, 60).until(
            lambda d: all(word in d.find_element("tag name", "body").text
                          for word in ("welcome", "safety", "thanks", "succeeded"))
        )
        driver.save_screenshot(str(SCREENSHOTS / "prefect-report-artifact.png"))
    finally:
        driver.quit()
