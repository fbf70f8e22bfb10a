"""Precision (bf16 | fp8) as a setting, a manifest column and a field of the segment job, up to the worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from paced import PACED, paced_job

from flows import steps
from flows.batch import _fingerprint_settings
from flows.settings import BatchSettings, SettingsError, load_settings
from tasks import layout
from tasks.generate import stage
from tasks.generate.pool import GeneratorPool
from tasks.generate.pool_config import PoolConfig, SegmentFailed
from tasks.manifest import validate_manifest
from tasks.records import Plan, Segment

ROOT = Path(__file__).resolve().parents[1]


def manifest(examples: Path, cells: list[str]) -> Path:
    """The example row once per precision cell (ids r1, r2, ...)."""
    lines = ["id,audio,image,precision"] + [
        f"r{i},media/welcome.wav,media/astronaut.jpg,{cell}" for i, cell in enumerate(cells, start=1)
    ]
    path = examples / "precision.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_setting_from_options_environment_and_its_values(monkeypatch) -> None:
    assert BatchSettings().precision == "bf16"
    assert load_settings(precision="fp8").precision == "fp8"
    monkeypatch.setenv("S2V_PRECISION", "fp8")
    assert BatchSettings().precision == "fp8"
    with pytest.raises(SettingsError, match="precision"):
        load_settings(precision="fp16")


def test_rows_may_name_the_batch_precision_only(examples: Path) -> None:
    path = manifest(examples, ["", "bf16", "FP8", "fp16"])
    result = validate_manifest(str(path), precision="bf16")
    assert [r.id for r in result.rows] == ["r1", "r2"]
    assert [r.precision for r in result.rows] == [None, "bf16"]
    assert [(i.row, i.field) for i in result.issues] == [(3, "precision"), (4, "precision")]
    assert "'fp8' is not the batch's precision 'bf16'" in str(result.issues[0]) and "--precision fp8" in str(
        result.issues[0]
    )
    assert "'fp16' is not a precision; use bf16 or fp8" in str(result.issues[1])
    fp8 = validate_manifest(str(path), precision="fp8")
    assert [r.id for r in fp8.rows] == ["r1", "r3"] and fp8.rows[1].precision == "fp8"


def test_validate_command_names_each_bad_row_once(examples: Path) -> None:
    path = manifest(examples, ["fp8", "bf16"])
    run = subprocess.run([sys.executable, "-m", "flows", "validate", str(path), "--precision", "fp8", "--json"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert run.returncode == 1, run.stderr
    assert '"valid": 1' in run.stdout and run.stdout.count('"field": "precision"') == 1


def test_precision_reaches_the_job_and_the_fingerprints_only_when_not_bf16(examples: Path, tmp_path: Path) -> None:
    row = validate_manifest(str(manifest(examples, [""])), precision="bf16").rows[0]
    # An unset column leaves the row's record as before, so earlier done markers stay valid.
    assert "precision" not in row.model_dump(mode="json")
    bf16, fp8 = BatchSettings(), BatchSettings(precision="fp8")
    assert "precision" not in _fingerprint_settings(bf16, "wan-s2v")
    assert layout.row_fingerprint(row, _fingerprint_settings(bf16, "wan-s2v")) != layout.row_fingerprint(
        row, _fingerprint_settings(fp8, "wan-s2v")
    )
    assets = steps.normalize_step(row, tmp_path / "row", bf16)
    segment = Segment(index=0, start_sample=0, end_sample=16000, start_s=0, end_s=1, frames=16, clips=1, seed=1)
    plan = Plan(row_id=row.id, width=assets.width, height=assets.height, segments=[segment])
    job, _ = steps.segment_job(row, assets, plan, [], 0, fp8)
    assert job.precision == "fp8"
    # Clips rendered in one precision are not reused for the other.
    generator = steps.load_backend("preview", bf16)
    bf16_job = job.model_copy(update={"precision": "bf16"})
    assert stage.job_fingerprint(job, generator) != stage.job_fingerprint(bf16_job, generator)


@pytest.mark.usefixtures("local_ray")
def test_a_worker_refuses_a_segment_asking_for_another_precision(inputs, tmp_path: Path) -> None:
    config = PoolConfig(backend=PACED, backend_options={"clip_s": 0.01}, precision="bf16", workers=1, attempts=1)
    job = paced_job(inputs, "fp8row", 0, 1).model_copy(update={"precision": "fp8"})
    with GeneratorPool(config) as pool:
        with pytest.raises(SegmentFailed, match="asks for precision fp8; this worker's model runs in bf16"):
            pool.submit(job, tmp_path / "seg").result(timeout=60)
        ok = pool.submit(job.model_copy(update={"precision": "bf16"}), tmp_path / "ok").result(timeout=60)
    assert len(ok.clips) == 1
