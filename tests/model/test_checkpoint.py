"""Checkpoint loading: official folder round trip (sharded and single file), the ComfyUI bf16 and
fp8-scaled single files, and a clear CheckpointError naming the file for each kind of bad
checkpoint. (An s3:// checkpoint is mirrored by tasks.generate.checkpoints: tests/test_checkpoints_fetch.py.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import (
    CheckpointError,
    Fp8Linear,
    load_transformer,
    quantize_linears_fp8,
    save_official_dit,
    to_comfyui_state_dict,
)
from model.config import S2VConfig
from model.layout import detect_layout
from model.transformer import WanS2VTransformer, randomize_


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.fixture
def official_dir(tmp_path: Path, tiny_dit: WanS2VTransformer) -> Path:
    folder = tmp_path / "Wan2.2-S2V-tiny"
    save_official_dit(tiny_dit, folder, max_shard_bytes=300_000)
    return folder


def test_official_round_trip_sharded(official_dir: Path, tiny_dit, dit_inputs) -> None:
    index = json.loads((official_dir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert detect_layout(official_dir) == "official"
    model = load_transformer(official_dir, dtype=torch.float32)
    _assert_same_weights(model, tiny_dit)
    assert model.config == tiny_dit.config
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(**dit_inputs), tiny_dit(**dit_inputs), rtol=0, atol=0)


def test_official_single_file_and_bf16(tmp_path: Path, tiny_dit) -> None:
    written = save_official_dit(tiny_dit, tmp_path / "one")
    assert sorted(p.name for p in written) == ["config.json", "diffusion_pytorch_model.safetensors"]
    model = load_transformer(tmp_path / "one" / "diffusion_pytorch_model.safetensors")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.compute_dtype == torch.bfloat16
    torch.testing.assert_close(
        model.state_dict()["blocks.1.ffn.0.weight"].float(),
        tiny_dit.state_dict()["blocks.1.ffn.0.weight"],
        rtol=1e-2,
        atol=1e-2,
    )


def test_missing_config(official_dir: Path) -> None:
    (official_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing config\.json; expected the official layout"):
        load_transformer(official_dir)


def test_missing_shard_is_named(official_dir: Path) -> None:
    shard = official_dir / "diffusion_pytorch_model-00002-of-00003.safetensors"
    if not shard.exists():
        shard = sorted(official_dir.glob("diffusion_pytorch_model-00002-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError) as err:
        load_transformer(official_dir)
    assert shard.name in str(err.value) and "named in diffusion_pytorch_model.safetensors.index.json" in str(err.value)


def test_missing_index_with_shards(official_dir: Path) -> None:
    (official_dir / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="missing diffusion_pytorch_model.safetensors.index.json .found shards"):
        load_transformer(official_dir)


def test_truncated_shard_is_named(official_dir: Path) -> None:
    shard = sorted(official_dir.glob("diffusion_pytorch_model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_transformer(official_dir)
    assert str(shard) in str(err.value) and "truncated or corrupt" in str(err.value)


def test_corrupt_index_and_config(official_dir: Path) -> None:
    index = official_dir / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json: not a safetensors index"):
        load_transformer(official_dir)
    (official_dir / "config.json").write_text(json.dumps({"dim": 100, "num_heads": 3}))
    with pytest.raises(CheckpointError, match=r"config\.json: not an S2V transformer config"):
        load_transformer(official_dir)


def test_another_models_weights(tmp_path: Path, tiny_config: S2VConfig) -> None:
    # weights of a wider model under the tiny model's config.json
    wide = WanS2VTransformer(dataclasses.replace(tiny_config, dim=128, ffn_dim=64, num_heads=4))
    save_official_dit(wide, tmp_path / "x")
    tiny_config.to_json(tmp_path / "x" / "config.json")
    with pytest.raises(CheckpointError) as err:
        load_transformer(tmp_path / "x")
    msg = str(err.value)
    assert "another model's weights?" in msg and "wrong shape" in msg and "patch_embedding.weight" in msg
    assert "diffusion_pytorch_model.safetensors" in msg


def test_missing_and_unexpected_keys(tmp_path: Path, tiny_dit) -> None:
    save_official_dit(tiny_dit, tmp_path / "k")
    path = tmp_path / "k" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd.pop("blocks.2.cross_attn.k.bias")
    sd["vace_blocks.0.weight"] = torch.zeros(2)
    save_file(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_transformer(tmp_path / "k")
    msg = str(err.value)
    assert "1 missing key(s), e.g. ['blocks.2.cross_attn.k.bias']" in msg
    assert "1 unexpected key(s), e.g. ['vace_blocks.0.weight']" in msg


def test_layout_detection_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file or folder"):
        detect_layout(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="expected the official layout"):
        load_transformer(tmp_path / "empty")


def test_comfyui_bf16_file(tmp_path: Path, tiny_dit, dit_inputs) -> None:
    path = tmp_path / "wan2.2_s2v_tiny_bf16.safetensors"
    save_file(to_comfyui_state_dict(tiny_dit), path)
    assert detect_layout(path) == "comfyui"
    model = load_transformer(path, dtype=torch.float32, config=tiny_dit.config)
    _assert_same_weights(model, tiny_dit)
    with torch.no_grad():
        torch.testing.assert_close(model(**dit_inputs), tiny_dit(**dit_inputs), rtol=0, atol=0)
    # a ComfyUI file that is not the 14B carries no config: say so
    with pytest.raises(CheckpointError, match="pass config="):
        load_transformer(path)


def test_comfyui_fp8_scaled_file(tmp_path: Path, tiny_dit, dit_inputs) -> None:
    sd = to_comfyui_state_dict(tiny_dit, fp8=True)
    key = "model.diffusion_model.blocks.0.self_attn.q"
    assert sd[key + ".weight"].dtype == torch.float8_e4m3fn and sd[key + ".scale_weight"].dtype == torch.float32
    path = tmp_path / "wan2.2_s2v_tiny_fp8_scaled.safetensors"
    save_file(sd, path)

    # no fp8 matmuls on this CPU: refused before anything is generated, naming the file
    with pytest.raises(CheckpointError) as err:
        load_transformer(path, dtype=torch.float32, config=tiny_dit.config)
    assert str(path) in str(err.value) and "fp8" in str(err.value) and "fp8='dequantize'" in str(err.value)

    model = load_transformer(path, dtype=torch.float32, config=tiny_dit.config, fp8="dequantize")
    got, want = model.state_dict(), tiny_dit.state_dict()
    expected_q = sd[key + ".weight"].float() * sd[key + ".scale_weight"]
    torch.testing.assert_close(got["blocks.0.self_attn.q.weight"], expected_q, rtol=0, atol=0)
    # e4m3 keeps ~3 mantissa bits: weights within 1/16 relative, the unquantized ones exact
    w = want["blocks.0.self_attn.q.weight"]
    assert (got["blocks.0.self_attn.q.weight"] - w).abs().max() <= w.abs().max() / 16
    torch.testing.assert_close(got["head.head.weight"], want["head.head.weight"], rtol=0, atol=0)
    with torch.no_grad():
        out, ref = model(**dit_inputs), tiny_dit(**dit_inputs)
    assert ((out - ref).norm() / ref.norm()) < 0.1


def test_fp8_linear_matches_its_dequantized_weight() -> None:
    torch.manual_seed(0)
    weight = torch.randn(24, 16)
    scale = weight.abs().max() / 448
    layer = Fp8Linear((weight / scale).to(torch.float8_e4m3fn), scale, torch.randn(24))
    x = torch.randn(3, 5, 16)
    bf16 = torch.bfloat16  # fp8 matmuls produce bf16
    expected = torch.nn.functional.linear(x.to(bf16), layer.dequantized_weight().to(bf16), layer.bias.to(bf16))
    torch.testing.assert_close(layer(x), expected)


def test_dtype_conversion_keeps_values(tmp_path: Path) -> None:
    model = randomize_(WanS2VTransformer(S2VConfig.tiny()), seed=5)
    save_official_dit(model.to(torch.bfloat16), tmp_path / "b")
    loaded = load_transformer(tmp_path / "b", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    _assert_same_weights(loaded.to(torch.bfloat16), model)


def test_quantize_linears_fp8_is_close_and_keeps_other_layers(tiny_config: S2VConfig, dit_inputs) -> None:
    model = randomize_(WanS2VTransformer(tiny_config), seed=1).eval().requires_grad_(False)
    with torch.no_grad():
        ref = model(**dit_inputs)
        converted = quantize_linears_fp8(model)
        out = model(**dit_inputs)
    assert converted == tiny_config.num_layers * 10  # q, k, v, o twice and two ffn layers per block
    assert isinstance(model.blocks[0].ffn[0], Fp8Linear) and model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    assert isinstance(model.audio_injector.injector[0].q, torch.nn.Linear)  # outside the blocks: unchanged
    assert ((out - ref).norm() / ref.norm()) < 0.05
