"""Reference-image checks acting on rows: the flags, the image policy (warn, skip, fail), the report."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from media import astronaut, on_canvas, quadrants, speech
from PIL import ImageFilter

from flows.batch import batch
from flows.settings import BatchSettings
from flows.states import BatchFailed
from tasks.normalize.image import MIN_FACE_PX, MIN_SHARPNESS, check_image, normalize_image
from tasks.records import Resolution, RowFailure


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Portraits made here: the real photo, the same blurred, its face small in a wide frame, and no face."""
    folder = tmp_path_factory.mktemp("images")
    photo = astronaut()  # 512x512, a half-length portrait; its face is 106 px high at 480p
    made = {
        "sharp": photo,
        # 3 px at the photo's scale is ~3.4 px at the 576x576 output: a reference clearly out of focus.
        "blurry": photo.filter(ImageFilter.GaussianBlur(3)),
        # The photo at half the frame's height: the face is still found, but ~53 px high.
        "small_face": on_canvas(photo.resize((500, 500)), (1000, 1000), (250, 250)),
        "no_face": quadrants((640, 480)),
    }
    paths = {}
    for name, img in made.items():
        paths[name] = folder / f"{name}.png"
        img.save(paths[name])
    return paths


def checks(path: Path, tmp_path: Path):
    _, _, height, qc = normalize_image(path, tmp_path / path.stem, Resolution.P480)
    return qc, height


def test_flags_name_what_is_wrong_with_the_reference(images: dict[str, Path], tmp_path: Path) -> None:
    qc, height = checks(images["sharp"], tmp_path)
    assert qc.face_found and qc.face_height_ratio * height >= MIN_FACE_PX and qc.sharpness >= MIN_SHARPNESS
    assert check_image(qc, height, "fail") == []  # the example portrait passes every check

    qc, height = checks(images["blurry"], tmp_path)
    (flag,) = check_image(qc, height)
    assert flag.startswith("image_blurry:") and qc.sharpness < MIN_SHARPNESS

    qc, height = checks(images["small_face"], tmp_path)
    (flag,) = check_image(qc, height)
    assert qc.face_found and flag.startswith("image_face_small:") and "crop closer" in flag
    assert f"{qc.face_height_ratio * height:.0f} px high" in flag

    qc, height = checks(images["no_face"], tmp_path)
    (flag,) = check_image(qc, height)
    assert not qc.face_found and flag.startswith("image_no_face:")


def test_policy_fail_raises_naming_the_image_column(images: dict[str, Path], tmp_path: Path) -> None:
    qc, height = checks(images["blurry"], tmp_path)
    assert check_image(qc, height, "skip") == check_image(qc, height, "warn")  # skipping is the caller's act
    with pytest.raises(RowFailure) as info:
        check_image(qc, height, "fail")
    assert info.value.field == "image" and "image_blurry" in info.value.reason
    with pytest.raises(ValueError, match="image policy"):
        check_image(qc, height, "ignore")


def test_blur_threshold_sits_between_sharp_and_blurred_versions_of_one_photo(tmp_path: Path) -> None:
    """The threshold's documented measurements, redone: Gaussian blur of 0.5 and 1.5 px at the output scale."""
    photo = astronaut()
    scale = photo.height / 576  # the 480p bucket of a square photo is 576x576
    found = {}
    for sigma in (0.5, 1.5):
        path = tmp_path / f"blur{sigma}.png"
        photo.filter(ImageFilter.GaussianBlur(sigma * scale)).save(path)
        found[sigma] = checks(path, tmp_path)[0].sharpness
    assert found[0.5] > MIN_SHARPNESS > found[1.5]


@pytest.mark.slow
def test_image_policy_in_a_batch_shows_in_the_report(prefect_api, images: dict[str, Path], tmp_path: Path) -> None:
    speech(tmp_path / "hello.wav", "Hello there, and welcome to the course.")
    rows = ["id,audio,image"] + [f"{name},hello.wav,{path}" for name, path in images.items()]
    (tmp_path / "batch.csv").write_text("\n".join(rows) + "\n")
    settings = BatchSettings(image_policy="skip", allowed_roots=[str(images["sharp"].parent)], infer_frames=48)
    report = asyncio.run(batch(str(tmp_path / "batch.csv"), str(tmp_path / "out"), settings))
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rows"] == report["rows"]
    by_id = {r["id"]: r for r in report["rows"]}
    assert by_id["sharp"]["status"] == "succeeded" and not any(f.startswith("image_") for f in by_id["sharp"]["flags"])
    for name, flag in (("blurry", "image_blurry"), ("small_face", "image_face_small"), ("no_face", "image_no_face")):
        row = by_id[name]
        assert row["status"] == "skipped" and row["flags"][0].startswith(flag) and flag in row["error"], row
        assert row["image_qc"] is not None and row["video"] is None
    assert not (tmp_path / "out" / "blurry.mp4").exists()

    # Under 'fail' such a row fails with one line naming the row and the column; under 'warn' it is
    # rendered and keeps its flag.
    (tmp_path / "one.csv").write_text(f"id,audio,image\nblurry,hello.wav,{images['blurry']}\n")
    settings = settings.model_copy(update={"image_policy": "fail"})
    with pytest.raises(BatchFailed) as batch_failed:  # its one row failed: the batch is Failed
        asyncio.run(batch(str(tmp_path / "one.csv"), str(tmp_path / "out-fail"), settings))
    (failed,) = batch_failed.value.report["rows"]
    assert failed["status"] == "failed" and "column 'image'" in failed["error"] and "image_blurry" in failed["error"]
    assert failed["error"].startswith("row 1 (id 'blurry')")
    settings = settings.model_copy(update={"image_policy": "warn"})
    (warned,) = asyncio.run(batch(str(tmp_path / "one.csv"), str(tmp_path / "out-warn"), settings))["rows"]
    assert warned["status"] == "succeeded" and warned["flags"][0].startswith("image_blurry")
