"""tasks.generate.checkpoints: an s3:// checkpoint mirrored into the local cache, then loaded by the
model (which reads local paths only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.checkpoint import load_transformer
from model.layout import CheckpointError
from model.pipeline import S2VPipeline
from model.tiny import write_tiny_checkpoint, write_tiny_comfyui
from tasks.generate.checkpoints import local_checkpoint


def test_loads_from_s3(s3, tmp_path: Path):
    tiny_checkpoint = write_tiny_checkpoint(tmp_path / "tiny-s2v", seed=0)
    assert local_checkpoint(str(tiny_checkpoint)) == tiny_checkpoint  # a local folder is read where it is
    s3.put(str(tiny_checkpoint), "s2v-examples/ckpt", recursive=True)
    pipe = S2VPipeline.from_checkpoint(local_checkpoint("s3://s2v-examples/ckpt", tmp_path / "cache"), device="cpu")
    assert pipe.config.dim == 64 and pipe.audio_encoder.num_layers == pipe.config.audio_num_layers
    ours, theirs = pipe.transformer.state_dict(), load_transformer(tiny_checkpoint, dtype=torch.float32).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert list((tmp_path / "cache").rglob("*.safetensors"))  # cached locally
    s3.rm("s2v-examples/ckpt/Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError, match=r"s3://s2v-examples/ckpt is missing: Wan2\.1_VAE\.pth"):
        S2VPipeline.from_checkpoint(local_checkpoint("s3://s2v-examples/ckpt", tmp_path / "cache2"), device="cpu")


def test_comfyui_tree_from_s3(s3, tmp_path: Path):
    """ComfyUI's files are mirrored by name from its models/ folders; other files there are not."""
    models = write_tiny_comfyui(tmp_path / "comfy" / "models", seed=0, fp8_scaled=True)
    (models / "loras").mkdir()
    (models / "loras" / "other.safetensors").write_bytes(b"not fetched")
    s3.put(str(tmp_path / "comfy"), "s2v-examples/comfy", recursive=True)
    folder = local_checkpoint("s3://s2v-examples/comfy", tmp_path / "cache")
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors")) == [
        "models/audio_encoders/wav2vec2_large_english_fp16.safetensors",
        "models/diffusion_models/wan2.2_s2v_14B_fp8_scaled.safetensors",
        "models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        "models/vae/wan_2.1_vae.safetensors",
    ]
    pipe = S2VPipeline.from_checkpoint(folder, device="cpu", precision="bf16")
    assert pipe.files.dit_fp8 and pipe.precision == "bf16"
