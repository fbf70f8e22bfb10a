"""ComfyUI model folders as checkpoints (issue 14, items 3 and 4; model.layout.resolve, model.comfy):
the tiny ComfyUI files build the same pipeline as the official folder (bf16 exactly, scaled fp8
within fp8 rounding), alone or beside an official folder, and every bad checkpoint fails before
any weight is read with one line naming the file and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from media import gradient_image, voiced_tone
from safetensors.torch import load_file, save_file
from transformers import T5Tokenizer

from model import layout
from model.checkpoint import load_transformer
from model.layout import CheckpointError, resolve
from model.pipeline import DEFAULT_NEGATIVE_PROMPT, S2VPipeline
from model.tiny import TINY_VAE
from model.vae import diffusers_to_wan_vae

PROMPTS = ["A woman talks to the camera, smiling.", DEFAULT_NEGATIVE_PROMPT]


def _weights(pipe: S2VPipeline) -> dict[str, torch.Tensor]:
    parts = {"dit": pipe.transformer, "t5": pipe.text_encoder.model, "audio": pipe.audio_encoder.model,
             "vae": pipe.vae.model}  # fmt: skip
    return {f"{name}.{k}": v for name, module in parts.items() for k, v in module.state_dict().items()}


def _clips(pipe: S2VPipeline) -> list:
    args = (gradient_image(), voiced_tone(1.0), "a person talks")
    return list(pipe.generate_clips(*args, num_clips=2, infer_frames=8, steps=2, seed=3))


@pytest.fixture(scope="module")
def official(tiny_checkpoint: Path) -> S2VPipeline:
    return S2VPipeline.from_checkpoint(tiny_checkpoint, device="cpu")


def test_comfyui_bf16_files_build_the_official_pipeline(official: S2VPipeline, tiny_comfyui: Path):
    files = resolve(tiny_comfyui)  # the models/ folder
    assert files.dit.name == layout.COMFY_DIT_BF16 and files.dit.parent.name == "diffusion_models"
    assert files.tokenizer == files.text_encoder  # the tokenizer embedded in the umT5 file
    assert files.audio_config is None and not files.dit_fp8
    pipe = S2VPipeline.from_checkpoint(tiny_comfyui.parent, device="cpu")  # the ComfyUI folder above models/
    assert pipe.files == files and pipe.precision == "bf16"

    ours, theirs = _weights(pipe), _weights(official)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert pipe.config == official.config
    bookkeeping = {"_name_or_path", "architectures", "dtype"}  # the network is the same without them
    configs = [{k: v for k, v in p.audio_encoder.model.config.to_dict().items() if k not in bookkeeping}
               for p in (pipe, official)]  # fmt: skip
    assert configs[0] == configs[1]
    for prompt in PROMPTS:
        assert pipe.text_encoder.tokenizer(prompt).input_ids == official.text_encoder.tokenizer(prompt).input_ids
    for got, want in zip(_clips(pipe), _clips(official), strict=True):
        assert np.array_equal(got.frames, want.frames)
        assert all(np.array_equal(got.state[k], want.state[k]) for k in want.state)


def test_flat_folders_and_single_files(tiny_comfyui: Path, tmp_path: Path, make_mirror):
    tree = resolve(tiny_comfyui)
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in tiny_comfyui.rglob("*.safetensors"):
        (flat / path.name).symlink_to(path)
    assert [p.name for p in (resolve(flat).dit, resolve(flat).vae)] == [tree.dit.name, tree.vae.name]
    singles = resolve([tree.dit, tree.text_encoder, tree.vae, tree.audio_encoder])
    assert singles == tree
    # a renamed file is recognised by its keys
    renamed = make_mirror(tiny_comfyui, tmp_path / "renamed")
    (renamed / "vae" / layout.COMFY_VAE_CHECKPOINT).rename(renamed / "vae" / "my_wan_vae.safetensors")
    assert resolve(renamed).vae.name == "my_wan_vae.safetensors"


def test_comfyui_files_beside_an_official_folder(tiny_checkpoint: Path, tiny_comfyui: Path, tmp_path: Path):
    dit = tiny_comfyui / "diffusion_models" / layout.COMFY_DIT_BF16
    files = resolve([dit, tiny_checkpoint])  # the DiT from ComfyUI, the rest from the official folder
    assert files.dit == dit
    assert (files.text_encoder, files.tokenizer, files.vae, files.audio_encoder) == (
        tiny_checkpoint / layout.T5_CHECKPOINT, tiny_checkpoint / layout.T5_TOKENIZER,
        tiny_checkpoint / layout.VAE_CHECKPOINT, tiny_checkpoint / layout.WAV2VEC_DIR,
    )  # fmt: skip

    # a umT5 file without its tokenizer: the tokenizer comes from the official folder beside it
    bare = tmp_path / "comfy"
    bare.mkdir()
    state = load_file(tiny_comfyui / "text_encoders" / layout.COMFY_T5_FP16)
    del state["spiece_model"]
    save_file(state, bare / layout.COMFY_T5_FP16)
    for sub in ("diffusion_models", "vae", "audio_encoders"):
        for path in (tiny_comfyui / sub).iterdir():
            (bare / path.name).symlink_to(path)
    with pytest.raises(CheckpointError) as err:
        resolve(bare)
    assert "lacks the umT5 tokenizer: google/umt5-xxl/" in str(err.value)
    assert f"{layout.COMFY_T5_FP16} embeds none" in str(err.value)
    files = resolve([bare, tiny_checkpoint])
    assert files.text_encoder == bare / layout.COMFY_T5_FP16
    assert files.tokenizer == tiny_checkpoint / layout.T5_TOKENIZER
    assert files.audio_encoder.parent == bare and files.audio_config == tiny_checkpoint / layout.WAV2VEC_DIR
    pipe = S2VPipeline.from_checkpoint([bare, tiny_checkpoint], device="cpu")
    assert pipe.text_encoder.tokenizer(PROMPTS[0]).input_ids


def test_scaled_fp8_files_expand_within_fp8_rounding(official: S2VPipeline, tiny_comfyui_fp8: Path, dit_inputs):
    files = resolve(tiny_comfyui_fp8)
    assert files.dit.name == layout.COMFY_DIT_FP8 and files.text_encoder.name == layout.COMFY_T5_FP8 and files.dit_fp8
    pipe = S2VPipeline.from_checkpoint(tiny_comfyui_fp8, device="cpu", precision="bf16")
    assert pipe.precision == "bf16"
    ours, theirs = _weights(pipe), _weights(official)
    assert ours.keys() == theirs.keys()
    rounded = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    # the block linears of the DiT and the umT5 linears were fp8; e4m3 keeps 3 mantissa bits
    assert rounded and all(".blocks." in k or ".encoder.block." in k for k in rounded)
    assert any(k.startswith("t5.") for k in rounded) and any(k.startswith("dit.") for k in rounded)
    for key in rounded:
        assert (ours[key] - theirs[key]).abs().max() <= theirs[key].abs().max() / 16, key
    with torch.no_grad():
        out, ref = pipe.transformer(**dit_inputs), official.transformer(**dit_inputs)
    assert ((out - ref).norm() / ref.norm()) < 0.1


def test_fp8_precision_is_refused_without_fp8_matmuls(tiny_checkpoint: Path, tiny_comfyui_fp8: Path):
    with pytest.raises(CheckpointError) as err:  # the fp8 file's default precision is fp8
        S2VPipeline.from_checkpoint(tiny_comfyui_fp8, device="cpu")
    msg = str(err.value)
    assert f"precision fp8 (the default for {layout.COMFY_DIT_FP8}, which stores fp8 weights)" in msg
    assert "device cpu is not a CUDA GPU" in msg and "set precision = bf16" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match=r"precision fp8 needs fp8 matmuls.*: set precision = bf16$"):
        S2VPipeline.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="precision 'fp16': expected one of bf16, fp8"):
        S2VPipeline.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp16")


def test_missing_components_are_named_with_where_they_come_from(tiny_comfyui: Path, tmp_path: Path, make_mirror):
    folder = make_mirror(tiny_comfyui, tmp_path / "models", {f"vae/{layout.COMFY_VAE_CHECKPOINT}",
                                                            f"audio_encoders/{layout.COMFY_WAV2VEC}"})  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        S2VPipeline.from_checkpoint(folder, device="cpu")
    msg = str(err.value)
    assert f"the VAE: {layout.VAE_CHECKPOINT} or {layout.COMFY_VAE_CHECKPOINT} (ComfyUI models/vae)" in msg
    assert f"the audio encoder: {layout.WAV2VEC_DIR}/ or {layout.COMFY_WAV2VEC}" in msg
    assert "the DiT" not in msg and "\n" not in msg


def test_a_file_of_another_model_is_named_with_what_it_is(tiny_comfyui: Path, tmp_path: Path, make_mirror):
    folder = make_mirror(tiny_comfyui, tmp_path / "models", {f"diffusion_models/{layout.COMFY_DIT_BF16}"})
    s2v = load_file(tiny_comfyui / "diffusion_models" / layout.COMFY_DIT_BF16)
    s2v_parts = ("casual_audio_encoder.", "audio_injector.", "cond_encoder.", "frame_packer.", "trainable_cond_mask.")
    t2v = {k: v for k, v in s2v.items() if not k.removeprefix("model.diffusion_model.").startswith(s2v_parts)}
    t2v_path = folder / "diffusion_models" / "wan2.1_t2v_tiny_bf16.safetensors"
    t2v_path.parent.mkdir(exist_ok=True)
    save_file(t2v, t2v_path)
    with pytest.raises(CheckpointError) as err:
        resolve(folder)
    msg = str(err.value)
    assert "lacks the DiT" in msg and "\n" not in msg
    assert ("wan2.1_t2v_tiny_bf16.safetensors is a Wan T2V DiT (width 64, 3 blocks; no casual_audio_encoder.*, "
            "audio_injector.*, cond_encoder.*, frame_packer.*), not Wan2.2-S2V") in msg  # fmt: skip
    with pytest.raises(CheckpointError, match=r"a Wan T2V DiT .*use wan2\.2_s2v_14B_bf16\.safetensors"):
        load_transformer(t2v_path)

    # the Wan2.2 VAE (48 latent channels) where the Wan2.1 VAE belongs
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    wan22 = diffusers_to_wan_vae(AutoencoderKLWan(**{**TINY_VAE, "z_dim": 48}).state_dict(), 1)
    (folder / "vae" / layout.COMFY_VAE_CHECKPOINT).unlink()
    save_file({k: v.contiguous() for k, v in wan22.items()}, folder / "vae" / "wan2.2_vae.safetensors")
    save_file(s2v, folder / "diffusion_models" / layout.COMFY_DIT_BF16)
    with pytest.raises(CheckpointError, match=r"wan2\.2_vae\.safetensors is a 48-channel VAE \(the Wan2\.2 VAE"):
        resolve(folder)

    # a T5 encoder that is not umT5 (one position bias, in block 0)
    (folder / "vae" / "wan2.2_vae.safetensors").unlink()
    (folder / "vae" / layout.COMFY_VAE_CHECKPOINT).symlink_to(tiny_comfyui / "vae" / layout.COMFY_VAE_CHECKPOINT)
    t5_path = folder / "text_encoders" / layout.COMFY_T5_FP16
    t5 = load_file(t5_path)
    t5_path.unlink()
    t5.pop("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight")
    save_file(t5, folder / "text_encoders" / "t5xxl_fp16.safetensors")
    with pytest.raises(CheckpointError, match=r"t5xxl_fp16\.safetensors is a T5 encoder with one position bias"):
        resolve(folder)


def test_truncated_files_are_named_before_anything_loads(
    tiny_checkpoint: Path, tiny_comfyui: Path, tmp_path: Path, make_mirror
):
    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.unlink()  # the mirror's symlink
        path.write_bytes(data[: len(data) * 3 // 4])

    comfy = make_mirror(tiny_comfyui, tmp_path / "comfy")
    truncate(comfy / "vae" / layout.COMFY_VAE_CHECKPOINT)
    with pytest.raises(CheckpointError, match=r"wan_2\.1_vae\.safetensors: unreadable safetensors file .*download"):
        S2VPipeline.from_checkpoint(comfy, device="cpu")

    official = make_mirror(tiny_checkpoint, tmp_path / "official")
    truncate(official / layout.T5_CHECKPOINT)
    with pytest.raises(CheckpointError) as err:
        resolve(official)
    assert str(official / layout.T5_CHECKPOINT) in str(err.value) and "truncated or corrupt" in str(err.value)
    assert "download it again" in str(err.value)

    official = make_mirror(tiny_checkpoint, tmp_path / "official2")
    shard = sorted(official.glob("diffusion_pytorch_model-*.safetensors"))[-1]
    truncate(shard)
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated or corrupt file"):
        resolve(official)


def test_a_tokenizer_of_another_model_is_refused(tiny_checkpoint: Path, tmp_path: Path, make_mirror):
    folder = make_mirror(tiny_checkpoint, tmp_path / "ckpt", {"google/umt5-xxl/tokenizer.json",
                                                             "google/umt5-xxl/tokenizer_config.json"})  # fmt: skip
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁w{i}", -1.0 - i / 1000) for i in range(297)]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(folder / layout.T5_TOKENIZER))
    with pytest.raises(CheckpointError) as err:
        S2VPipeline.from_checkpoint(folder, device="cpu")
    msg = str(err.value)
    assert msg.startswith(f"{folder / layout.T5_TOKENIZER}: the tokenizer has 300 tokens but the text encoder "
                          f"{layout.T5_CHECKPOINT} embeds only ")  # fmt: skip
    assert "a tokenizer of another model; use umT5's tokenizer" in msg and "\n" not in msg
