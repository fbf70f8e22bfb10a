"""The s2v-batch command line: plan, align, and one clear message when a batch cannot run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "manifests" / "examples"


def s2v(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, cwd=cwd, timeout=600)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plan_json_matches_the_documented_shape(tmp_path: Path) -> None:
    result = s2v("plan", str(EXAMPLES / "batch.csv"), "--json", env={"S2V_WORK_DIR": str(tmp_path / "work")})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["id"] for r in data["rows"]] == ["welcome", "safety", "thanks"]
    for row in data["rows"]:
        (segment,) = row["segments"]  # a few seconds of speech: one segment
        assert set(segment) >= {"start_s", "end_s", "frames", "clips", "seed", "est_gpu_s"}
        assert segment["start_s"] == 0 and segment["frames"] == -(-round(segment["end_s"] * 16000) * 16 // 16000)
        assert segment["clips"] == -(-segment["frames"] // 80) and segment["est_gpu_s"] > 0
    table = s2v("plan", str(EXAMPLES / "batch.csv"), env={"S2V_WORK_DIR": str(tmp_path / "work")})
    assert table.returncode == 0 and "welcome" in table.stdout and "GPU" in table.stdout


def test_align_json_gives_one_entry_per_script_word() -> None:
    script = "Thank you for joining this course. See you in the next lesson!"
    result = s2v("align", str(EXAMPLES / "media" / "thanks.flac"), "--script", script, "--json")
    assert result.returncode == 0, result.stderr
    words = json.loads(result.stdout)["words"]
    assert [w["word"] for w in words] == script.split()
    starts = [w["start"] for w in words]
    assert starts == sorted(starts) and 0 <= starts[0] < words[-1]["end"] <= 4.1
    assert all(w["end"] >= w["start"] for w in words)


def test_unreachable_prefect_api_is_one_message(tmp_path: Path) -> None:
    api = f"http://127.0.0.1:{closed_port()}/api"
    result = s2v("run", str(EXAMPLES / "batch.csv"), "--out", str(tmp_path / "out"), env={"PREFECT_API_URL": api})
    assert result.returncode == 2
    assert "cannot reach the Prefect API" in result.stderr and "PREFECT_API_URL" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_missing_s3_credentials_name_the_settings(s3, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL_S3"}
    # No instance-metadata lookups: credentials must come from the environment or not at all.
    env.update({"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_DEFAULT_REGION": "us-east-1"})
    result = subprocess.run([sys.executable, "-m", "flows", "validate", "s3://s2v-examples/batch.csv"],
                            capture_output=True, text=True, env={**env, "COLUMNS": "200"}, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "S3 credentials are missing or wrong" in result.stderr and "AWS_ACCESS_KEY_ID" in result.stderr
    assert "Traceback" not in result.stderr


def test_settings_options_their_old_spellings_and_the_config_reach_validate_and_run(examples, tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(examples / "media", elsewhere)
    manifest = examples / "outside.csv"
    manifest.write_text(f"id,audio,image\nx,{elsewhere}/welcome.wav,{elsewhere}/astronaut.jpg\n")
    refused = s2v("validate", str(manifest))
    assert refused.returncode == 1 and "outside the allowed folders" in refused.stdout
    for option in ("--allowed-roots", "--allowed-root"):  # the setting's name and the old spelling
        result = s2v("validate", str(manifest), option, str(elsewhere))
        assert result.returncode == 0, result.stdout + result.stderr
    config = tmp_path / "s2v.toml"
    config.write_text(f'allowed_roots = ["{elsewhere}"]\n')
    assert s2v("validate", str(manifest), "--config", str(config)).returncode == 0
    for option in ("--max-concurrent-rows", "--concurrency"):
        result = s2v("run", str(manifest), "--out", str(tmp_path / "o"), option, "0")
        assert result.returncode == 2 and "max_concurrent_rows" in result.stderr, result.stderr
        assert not (tmp_path / "o").exists()


def test_plan_costs_a_preset_on_a_gpu_kind_at_a_price(tmp_path: Path) -> None:
    env = {"S2V_WORK_DIR": str(tmp_path / "work")}
    exact = json.loads(s2v("plan", str(EXAMPLES / "batch.csv"), "--json", env=env).stdout)
    result = s2v("plan", str(EXAMPLES / "batch.csv"), "--json", "--preset", "fast", "--gpu-kind", "l40s",
                 "--gpu-price-per-hour", "2.5", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    fast = json.loads(result.stdout)
    assert fast["gpu"] == "L40S" and fast["price_per_gpu_hour"] == 2.5 and exact["est_cost"] is None
    assert fast["est_cost"] == pytest.approx(fast["est_gpu_s"] / 3600 * 2.5, abs=0.01)
    for e, f in zip(exact["rows"], fast["rows"], strict=True):  # fewer passes a clip, on a slower GPU
        assert f["est_cost"] is not None and f["est_gpu_s"] != e["est_gpu_s"]
    table = s2v("plan", str(EXAMPLES / "batch.csv"), "--gpu-price-per-hour", "2.5", env=env)
    assert table.returncode == 0 and "est cost" in table.stdout and "Plan (H100)" in table.stdout
    bad = s2v("plan", str(EXAMPLES / "batch.csv"), "--gpu-kind", "TPU", env=env)
    assert bad.returncode == 2 and "unknown GPU kind 'TPU'" in bad.stderr


def test_speed_settings_that_cannot_apply_stop_the_batch_before_it_starts(tmp_path: Path) -> None:
    result = s2v("run", str(EXAMPLES / "batch.csv"), "--out", str(tmp_path / "o"), "--step-cache", "magcache")
    assert result.returncode == 2 and "s2v-batch calibrate" in result.stderr and "Traceback" not in result.stderr
    result = s2v("run", str(EXAMPLES / "batch.csv"), "--out", str(tmp_path / "o"), "--lora", "gone.safetensors")
    assert result.returncode == 2 and "LoRA file not found: gone.safetensors" in result.stderr
    result = s2v("calibrate")
    assert result.returncode == 2 and "calibrate needs the model" in result.stderr
