"""Scheduled pick-up: every new manifest under a prefix runs once, never twice, even when runs overlap."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from flows.pickup import pickup, registry_for
from flows.settings import BatchSettings
from tasks.registry import Candidate, ManifestRegistry, PickupError, find_manifests

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]
ROOT = Path(__file__).resolve().parents[1]




def drop(prefix: Path) -> None:
    """A nightly drop: two one-row manifests (one a renamed copy of the other's content) and a broken one."""
    media = prefix / "media"
    shutil.copytree(ROOT / "manifests" / "examples" / "media", media)
    (prefix / "monday.csv").write_text("id,audio,image,script\nthanks,media/thanks.flac,media/astronaut.jpg,"
                                       "Thank you for joining this course. See you in the next lesson!\n")
    (prefix / "tuesday.csv").write_text("id,audio,image\nbye,media/thanks.flac,media/astronaut.jpg\n")
    (prefix / "broken.csv").write_text("name,path\nx,y\n")
    (prefix / "notes.txt").write_text("not a manifest")


def test_overlapping_runs_process_each_manifest_once(tmp_path: Path) -> None:
    prefix, out = tmp_path / "drop", tmp_path / "out"
    drop(prefix)
    settings = BatchSettings(work_dir=str(tmp_path / "work"))

    async def two_overlapping_runs():
        return await asyncio.gather(pickup(str(prefix), str(out), settings), pickup(str(prefix), str(out), settings))

    first, second = asyncio.run(two_overlapping_runs())
    ran = [r["manifest"] for r in first["ran"] + second["ran"]]
    assert sorted(Path(m).name for m in ran) == ["monday.csv", "tuesday.csv"]  # once each, across both runs
    failed = first["could_not_run"] + second["could_not_run"]
    assert {Path(f["manifest"]).name for f in failed} == {"broken.csv"}
    assert "lacks required column" in failed[0]["error"]
    assert (out / "monday" / "thanks.mp4").exists() and (out / "tuesday" / "bye.mp4").exists()
    report = json.loads((out / "monday" / "report.json").read_text())
    assert report["counts"]["succeeded"] == 1

    # The next scheduled run finds nothing new; the broken manifest was not marked processed.
    third = asyncio.run(pickup(str(prefix), str(out), settings))
    assert sorted(Path(m).name for m in third["already_processed"]) == ["monday.csv", "tuesday.csv"]
    assert [Path(f["manifest"]).name for f in third["could_not_run"]] == ["broken.csv"]
    registry = registry_for(str(out))
    broken = next(c for c in find_manifests(str(prefix)) if c.uri.endswith("broken.csv"))
    assert not registry.is_processed(broken.digest) and registry.claim_info(broken.digest) is None


def test_missing_prefix_names_the_parameter(tmp_path: Path) -> None:
    state = asyncio.run(pickup(str(tmp_path / "nowhere"), str(tmp_path / "out"), return_state=True))
    assert state.is_failed()
    assert "does not exist" in state.message and "parameter 'prefix'" in state.message
    assert not (tmp_path / "out").exists()


def test_claims_are_exclusive_on_s3(s3) -> None:
    registry = ManifestRegistry("s3://s2v-examples/claims")
    candidate = Candidate(uri="s3://s2v-examples/batch.csv", digest="abc123")
    assert registry.claim(candidate, "run-1") is True
    assert registry.claim(candidate, "run-2") is False
    assert registry.claim_info("abc123")["owner"] == "run-1"
    registry.mark_processed(candidate, "s3://s2v-examples/out/report.json", {"succeeded": 3})
    assert registry.is_processed("abc123")
    found = find_manifests("s3://s2v-examples")
    assert [c.uri for c in found] == ["s3://s2v-examples/batch.csv"]
    with pytest.raises(PickupError, match="does not exist"):
        find_manifests("s3://s2v-examples/no/such/prefix")
