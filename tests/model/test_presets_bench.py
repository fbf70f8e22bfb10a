"""bench/presets_speed.py runs the same code on the CPU with --tiny that it runs on the H100."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_presets_bench_tiny(tmp_path: Path):
    out = tmp_path / "presets.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "presets_speed.py"), "--tiny", "--exact-steps", "2", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {(r["precision"], r["preset"]): r for r in doc["results"] if "preset" in r}
    assert set(rows) == {(p, n) for p in ("fp32", "fp8") for n in ("exact", "balanced", "fast")}
    assert rows["fp32", "exact"]["forwards"] == 80 and "extrapolated" in rows["fp32", "exact"]["how"]
    assert rows["fp32", "balanced"]["how"].startswith("measured") and rows["fp8", "fast"]["how"].startswith("derived")
    assert all(0 < r["forwards"] <= 36 and r["seconds_per_clip"] > 0 for k, r in rows.items() if k[1] != "exact")
    assert doc["summary"]["fp32"]["fast"]["met"] is None  # the targets are for 480p clips of 80 frames
    assert "calibrate" in doc["note"] and "| fp8 | fast |" in done.stdout
