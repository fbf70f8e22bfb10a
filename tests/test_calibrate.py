"""`calibrate` on the tiny checkpoint (mechanics only: random weights measure nothing about quality),
and its parts: the mouth region from the face detector, the drift metrics, reading the document."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.presets import preset
from tasks.calibrate import (
    DEFAULT_IMAGE,
    MAGCACHE_VARIANT,
    calibrate,
    drift,
    mouth_box,
    read_calibration,
    report_lines,
)
from tasks.cost import cost_model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-s2v"), seed=0)


def test_calibrate_writes_what_the_presets_and_planner_read(tiny_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "calibration.json"
    doc = calibrate(
        tiny_checkpoint, out, device="cpu", num_clips=2, infer_frames=8, size=(64, 64), steps=10, warmup=False
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert set(doc["presets"]) == {"balanced", "fast", MAGCACHE_VARIANT}
    assert doc["exact"]["forwards_per_clip"] == 20  # 10 guided steps, CFG as a batch of 2
    for name, r in doc["presets"].items():
        config = preset("balanced" if name == MAGCACHE_VARIANT else name)
        assert 0 < r["forwards_per_clip"] <= config.nominal_forwards(config.steps) < 2 * config.steps, name
        assert r["seconds_per_clip"] > 0 and r["speedup"] > 0
        assert np.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1
    ratios = doc["magcache"]["ratios"]
    assert len(ratios) == 10 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    assert doc["presets"][MAGCACHE_VARIANT]["speed"]["mag_ratios"] == ratios
    assert "measure nothing about quality" in doc["note"] and "not the 14B" in doc["warning"]
    assert any("faster" in line for line in report_lines(doc))

    # what the presets and the planner take from it
    again = read_calibration(out)
    assert preset("balanced", again, cache="magcache").mag_ratios == tuple(ratios)
    measured = doc["presets"]["fast"]["forwards_per_clip"]
    assert cost_model(preset="fast", speed=preset("fast"), calibration=again).measured_forwards == measured
    assert cost_model(preset="fast", speed=preset("fast", steps=20), calibration=again).measured_forwards is None


def test_calibration_files_that_are_not_one(tmp_path: Path):
    assert read_calibration(None) is None
    with pytest.raises(ValueError, match="does not exist"):
        read_calibration(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        read_calibration(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="not an s2v-batch calibration"):
        read_calibration(tmp_path / "other.json")


def test_mouth_region_and_drift():
    from model.pipeline import prepare_reference

    with Image.open(DEFAULT_IMAGE) as img:
        portrait = prepare_reference(img.convert("RGB"), 480, 480)
    box = mouth_box(portrait)
    assert box is not None
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= 480 and 0 <= y0 < y1 <= 480 and y0 > 100  # below the eyes
    assert mouth_box(np.full((64, 64, 3), 128, np.uint8)) is None

    video = np.stack([portrait] * 3)
    same = drift(video, video, box)
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0)
    noisy = np.clip(video.astype(int) + np.random.default_rng(0).integers(-20, 21, video.shape), 0, 255)
    changed = drift(video, noisy.astype(np.uint8), box)
    assert 20 < changed["psnr"] < 40 and changed["ssim"] < 0.99 and changed["mouth_psnr"] < 40
    assert drift(video, video)["mouth_psnr"] is None
