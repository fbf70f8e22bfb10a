"""`plan` over a process pool (setting plan_processes): the same plans and messages as in one process,
in manifest order; a row failing inside a worker process is that row's message; the cache is reused."""

from __future__ import annotations

from pathlib import Path

import pytest
from media import mixed_manifest
from rich.console import Console

from flows.preflight import available_cores, plan_manifest
from flows.settings import BatchSettings, load_settings


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """The examples' mixed manifest (a good row, one with warnings, a wrong file, a missing file) plus
    an audio file that is not audio and another good row, so the pool has rows to share out."""
    path = mixed_manifest(tmp_path_factory.mktemp("plan_pool") / "examples")
    (path.parent / "media" / "notaudio.wav").write_text("this is text, not a WAV file\n")
    with path.open("a") as f:
        f.write('broken,media/notaudio.wav,media/astronaut.jpg,"Hello there."\n')
        f.write('thanks,media/thanks.flac,media/astronaut.jpg,"Thank you for joining this course. '
                'See you in the next lesson!"\n')
    return path


def plan(manifest: Path, work: Path, processes: int):
    settings = BatchSettings(work_dir=str(work), plan_processes=processes)
    return plan_manifest(str(manifest), settings, console=Console(quiet=True))


def test_pool_plans_as_one_process_does_and_reuses_the_cache(manifest: Path, tmp_path: Path) -> None:
    one_plans, one_problems = plan(manifest, tmp_path / "one", 1)
    pool_plans, pool_problems = plan(manifest, tmp_path / "pool", 3)

    assert [p.row_id for p in one_plans] == ["welcome", "noface", "thanks"]  # manifest order
    assert [p.model_dump() for p in pool_plans] == [p.model_dump() for p in one_plans]
    assert pool_problems == one_problems
    assert any(p.row_id == "noface" and p.flags for p in pool_plans)  # the image warnings came back

    # A second plan takes every row's normalized files and alignment from the cache: nothing rewritten.
    cached = sorted((tmp_path / "pool").glob("*/*.json")) + sorted((tmp_path / "pool").glob("*/*.wav"))
    written = {f: f.stat().st_mtime_ns for f in cached if f.name != "plan.json"}
    again_plans, again_problems = plan(manifest, tmp_path / "pool", 2)
    assert [p.model_dump() for p in again_plans] == [p.model_dump() for p in one_plans]
    assert again_problems == one_problems
    assert written and {f: f.stat().st_mtime_ns for f in written} == written


def test_a_row_failing_in_a_worker_is_that_rows_message(manifest: Path, tmp_path: Path) -> None:
    plans, problems = plan(manifest, tmp_path, 2)

    broken = [p for p in problems if "id 'broken'" in p]
    assert len(broken) == 1 and broken[0].startswith("row 5 (id 'broken'), column 'audio'"), problems
    skipped = [p for p in problems if "id 'wrongfile'" in p]
    assert len(skipped) == 1 and "skipped by mismatch_policy" in skipped[0]
    assert any("id 'missing'" in p and "file not found" in p for p in problems)
    assert [p.row_id for p in plans] == ["welcome", "noface", "thanks"]  # the other rows planned


def test_plan_processes_defaults_to_the_available_cores(monkeypatch) -> None:
    monkeypatch.setenv("S2V_PLAN_PROCESSES", "3")
    assert load_settings().plan_processes == 3
    monkeypatch.delenv("S2V_PLAN_PROCESSES")
    assert load_settings().plan_processes is None  # plan_manifest then uses available_cores()
    assert available_cores() >= 1
