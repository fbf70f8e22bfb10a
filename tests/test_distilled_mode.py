"""Distilled mode as a mode of the product: the `mode` column and setting, what distilled rows and
batches refuse (one line each, before any GPU time), the planner's clips and cost, the job's
fingerprint, and the CLI options generated from the settings."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from test_cli import EXAMPLES, s2v
from test_manifest import write

from flows.settings import BatchSettings, SettingsError
from flows.steps import check_mode_settings, row_mode
from model.config import S2VConfig
from model.tiny import write_liveavatar_lora, write_tiny_checkpoint
from tasks import plan
from tasks.cost import DISTILLED_FORWARD_COSTS, DISTILLED_OVERHEAD_PER_CLIP_S, cost_model
from tasks.generate.preview import PreviewGenerator
from tasks.generate.stage import job_fingerprint
from tasks.manifest import validate_manifest
from tasks.records import RowFailure, Segment, SegmentJob


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distilled-settings")
    wide = dataclasses.replace(S2VConfig.tiny(), dim=128, num_heads=4, ffn_dim=256)
    return {
        "checkpoint": write_tiny_checkpoint(root / "ckpt", seed=4),
        "lora": write_liveavatar_lora(root / "liveavatar.safetensors", S2VConfig.tiny()),
        "other_lora": write_liveavatar_lora(root / "other.safetensors", wide),
    }


def test_mode_column_defaults_and_what_distilled_rows_refuse(examples: Path) -> None:
    manifest = write(examples / "modes.csv", "\n".join([
        "id,audio,image,mode,steps,guidance,negative_prompt,preset,resolution",
        "a,media/welcome.wav,media/astronaut.jpg,distilled,,,,,",
        "b,media/welcome.wav,media/astronaut.jpg,,,,,,",
        "c,media/welcome.wav,media/astronaut.jpg,Distilled,20,4.5,blurry,fast,720p",
        "d,media/welcome.wav,media/astronaut.jpg,turbo,,,,,",
        "e,media/welcome.wav,media/astronaut.jpg,exact,30,,,,",
    ]) + "\n")  # fmt: skip
    result = validate_manifest(str(manifest))
    rows = {r.id: r for r in result.rows}
    assert (rows["a"].mode, rows["a"].steps, rows["a"].guidance) == ("distilled", 4, 1.0)
    assert (rows["b"].mode, rows["b"].steps, rows["b"].guidance) == (None, 40, 4.5)
    assert [str(i) for i in result.issues] == [
        "row 3 (id 'c'), column 'guidance': distilled mode has no classifier-free guidance; leave guidance empty",
        "row 3 (id 'c'), column 'negative_prompt': distilled mode has no classifier-free guidance, so no negative "
        "prompt",
        "row 3 (id 'c'), column 'preset': distilled mode samples its own 4 steps; speed presets apply to exact "
        "mode only",
        "row 3 (id 'c'), column 'resolution': distilled mode at 720p needs a 139 GiB KV cache, more than one GPU "
        "holds; use 480p",
        "row 3 (id 'c'), column 'steps': distilled mode samples the 4 steps LiveAvatar was distilled to; "
        "leave steps empty",
        "row 4 (id 'd'), column 'mode': unknown mode 'turbo'; use exact, distilled",
    ]

    # the batch in distilled mode: rows without a mode cell take its defaults, an 'exact' cell its own
    batch = {r.id: r for r in validate_manifest(str(manifest), mode="distilled").rows}
    assert (batch["b"].mode, batch["b"].steps, batch["b"].guidance) == (None, 4, 1.0)
    assert (batch["e"].mode, batch["e"].steps) == ("exact", 30)


def test_batch_settings_distilled_cannot_honour_stop_it(tiny: dict[str, Path]) -> None:
    ckpt = str(tiny["checkpoint"])
    base = {"checkpoint": ckpt, "backend": "wan-s2v"}
    cases = [
        ({"mode": "distilled"}, "needs distilled_lora"),
        ({"mode": "distilled", "distilled_lora": str(tiny["other_lora"])}, "distilled_lora: .* does not fit"),
        ({"mode": "distilled", "distilled_lora": str(tiny["lora"]), "preset": "fast"}, "apply to exact mode only"),
        ({"mode": "distilled", "distilled_lora": str(tiny["lora"]), "lora": [str(tiny["lora"])]}, "setting lora"),
        ({"distilled_lora": str(tiny["checkpoint"] / "missing.safetensors")}, "distilled_lora: .*does not exist"),
    ]
    for update, message in cases:
        with pytest.raises(SettingsError, match=message):
            check_mode_settings(BatchSettings(**base, **update), "wan-s2v")
    check_mode_settings(BatchSettings(**base, mode="distilled", distilled_lora=str(tiny["lora"])), "wan-s2v")
    check_mode_settings(BatchSettings(mode="distilled"), "preview")  # the animatic needs no LoRA


def test_a_distilled_row_in_an_exact_batch(examples: Path, tiny: dict[str, Path]) -> None:
    manifest = write(examples / "one.csv", "id,audio,image,mode\na,media/welcome.wav,media/astronaut.jpg,distilled\n")
    (row,) = validate_manifest(str(manifest)).rows
    model = {"checkpoint": str(tiny["checkpoint"]), "backend": "wan-s2v"}
    with pytest.raises(RowFailure, match="needs LiveAvatar's LoRA"):
        row_mode(row, BatchSettings(**model))
    with pytest.raises(RowFailure, match="preset 'balanced' applies to exact mode only"):
        row_mode(row, BatchSettings(**model, distilled_lora=str(tiny["lora"]), preset="balanced"))
    assert row_mode(row, BatchSettings(**model, distilled_lora=str(tiny["lora"]))) == "distilled"
    with pytest.raises(RowFailure, match="one GPU per worker .* gpus_per_worker=2") as refused:
        row_mode(row, BatchSettings(**model, distilled_lora=str(tiny["lora"]), gpus_per_worker=2))
    assert refused.value.field == "mode"
    assert row_mode(row.model_copy(update={"mode": None}), BatchSettings(**model)) == "exact"


def test_planner_clips_and_cost_in_distilled_mode() -> None:
    seconds = 20.0
    samples = int(seconds * 16_000)
    kwargs = {"seed": 1, "width": 832, "height": 480, "max_segment_s": 60.0}
    exact = plan.plan_row("r", samples, None, infer_frames=80, cost=cost_model("H100"), **kwargs)
    distilled = plan.plan_row(
        "r", samples, None, infer_frames=48, cost=cost_model("H100", mode="distilled"), steps=4, guidance=1.0,
        **kwargs,
    )  # fmt: skip
    (seg,) = distilled.segments
    assert seg.clips == math.ceil(seg.frames / 48)
    cost = DISTILLED_FORWARD_COSTS["H100", "480p"]
    passes = 4 * 4 * (cost.first_clip_s + (seg.clips - 1) * cost.later_clip_s)
    assert seg.est_gpu_s == pytest.approx(passes + seg.clips * DISTILLED_OVERHEAD_PER_CLIP_S, abs=1e-3)
    assert seg.est_gpu_s < exact.segments[0].est_gpu_s / 5
    assert cost_model("H100", mode="distilled").estimate(3, resolution="720p", steps=4, guidance=1.0) is None


def test_distilled_jobs_fingerprint_apart_from_exact_ones(tmp_path: Path) -> None:
    (tmp_path / "i.png").write_bytes(b"image")
    (tmp_path / "a.wav").write_bytes(b"audio")
    segment = Segment(index=0, start_sample=0, end_sample=16_000, start_s=0.0, end_s=1.0, frames=16, clips=1, seed=1)
    job = SegmentJob(row_id="r", segment=segment, image=str(tmp_path / "i.png"), audio=str(tmp_path / "a.wav"),
                     prompt="p", width=64, height=64)  # fmt: skip
    distilled = job.model_copy(update={"mode": "distilled", "distilled_lora": "la.safetensors"})
    gen = PreviewGenerator()
    assert job_fingerprint(job, gen) != job_fingerprint(distilled, gen)
    assert job_fingerprint(job, gen) == job_fingerprint(job.model_copy(update={"mode": None}), gen)


def test_cli_options_plan_and_a_refused_run(tmp_path: Path, tiny: dict[str, Path]) -> None:
    env = {"S2V_WORK_DIR": str(tmp_path / "work")}
    result = s2v("plan", str(EXAMPLES / "batch.csv"), "--json", "--mode", "distilled", env=env)
    assert result.returncode == 0, result.stderr
    planned = json.loads(result.stdout)
    for row in planned["rows"]:
        assert all(s["clips"] == math.ceil(s["frames"] / 48) for s in row["segments"])
    result = s2v("run", str(EXAMPLES / "batch.csv"), "--out", str(tmp_path / "o"), "--mode", "distilled",
                 "--backend", "wan-s2v", "--checkpoint", str(tiny["checkpoint"]))  # fmt: skip
    assert result.returncode == 2 and "needs distilled_lora" in result.stderr and "Traceback" not in result.stderr
