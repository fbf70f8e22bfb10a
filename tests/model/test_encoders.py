"""Text encoder, audio encoder, VAE and sampler, loaded from the tiny checkpoint's official files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from transformers import UMT5Config, UMT5EncoderModel

from model.audio_encoder import AudioEncoder, frame_indices
from model.config import S2VConfig
from model.layout import T5_CHECKPOINT, T5_TOKENIZER, VAE_CHECKPOINT, CheckpointError
from model.sampler import make_scheduler, shift_for
from model.text_encoder import TextEncoder, clean_prompt, hf_to_wan_t5, wan_to_hf_t5
from model.vae import WanVAE, diffusers_to_wan_vae, wan_to_diffusers_vae


@pytest.fixture(scope="module")
def text_encoder(tiny_checkpoint: Path) -> TextEncoder:
    return TextEncoder.from_checkpoint(
        tiny_checkpoint / T5_CHECKPOINT, tiny_checkpoint / T5_TOKENIZER, dtype=torch.float32, text_len=32
    )


def test_t5_key_conversion_round_trips_and_loads_strictly(tiny_checkpoint: Path, text_encoder: TextEncoder):
    config = UMT5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=24, num_layers=3, num_heads=2,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # fmt: skip
    hf = UMT5EncoderModel(config).state_dict()
    wan = hf_to_wan_t5(hf)
    assert "blocks.2.ffn.gate.0.weight" in wan and "blocks.0.pos_embedding.embedding.weight" in wan
    back = wan_to_hf_t5(wan)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)

    # the tiny file is in Wan's naming; every tensor lands where the mapping says
    wan_file = torch.load(tiny_checkpoint / T5_CHECKPOINT, weights_only=True)
    loaded = text_encoder.model.state_dict()
    for key, value in wan_to_hf_t5(wan_file).items():
        assert torch.equal(loaded[key], value.float()), key


def test_t5_embeddings_cut_padding_and_ignore_text_len(tiny_checkpoint: Path, text_encoder: TextEncoder):
    prompts = ["A woman speaks to the camera.", "blurry,   low quality &amp; static"]
    out = text_encoder.encode(prompts)
    assert clean_prompt(prompts[1]) == "blurry, low quality & static"
    counts = [len(text_encoder.tokenizer(clean_prompt(p)).input_ids) for p in prompts]  # with </s>
    assert [tuple(t.shape) for t in out] == [(n, 32) for n in counts]
    assert all(torch.isfinite(t).all() for t in out)
    # padding is masked out: a longer text_len gives the same embeddings
    longer = TextEncoder(text_encoder.model, text_encoder.tokenizer, text_len=48)
    for a, b in zip(out, longer.encode(prompts), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_t5_unknown_key_fails_naming_file_and_key(tiny_checkpoint: Path, tmp_path: Path):
    state = torch.load(tiny_checkpoint / T5_CHECKPOINT, weights_only=True)
    state["blocks.0.attn.extra.weight"] = torch.zeros(2)
    bad = tmp_path / T5_CHECKPOINT
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"models_t5_umt5-xxl-enc-bf16\.pth.*blocks\.0\.attn\.extra\.weight"):
        TextEncoder.from_checkpoint(bad, tiny_checkpoint / T5_TOKENIZER)


def test_audio_conditioning_shape_buckets_and_padding(tiny_checkpoint: Path):
    enc = AudioEncoder.from_folder(tiny_checkpoint / "wav2vec2-large-xlsr-53-english")
    t = np.arange(int(16_000 * 1.5)) / 16_000
    wave = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    feats = enc.features(wave, 16_000)
    layers = S2VConfig.tiny().audio_num_layers  # every hidden state: embeddings + each layer
    assert feats.shape == (layers, int(74 / 50 * 30), 32)  # 1.5 s: 74 wav2vec2 frames -> 44 at 30 Hz
    cond = enc.conditioning(wave, 16_000, 40)  # 2.5 s of video for 1.5 s of audio
    assert cond.shape == (1, layers, 32, 40)
    idx = frame_indices(40)
    assert list(idx[:9]) == [0, 2, 4, 6, 8, 9, 11, 13, 15]  # round(i * 30 / 16), halves to even
    inside = idx < feats.shape[1]
    assert torch.equal(cond[0, :, :, inside].permute(0, 2, 1), feats[:, idx[inside]])
    assert not cond[..., ~inside].any()  # frames past the audio are zeros, as the reference pads


def test_audio_rejects_wrong_rate_and_shape(tiny_checkpoint: Path):
    enc = AudioEncoder.from_folder(tiny_checkpoint / "wav2vec2-large-xlsr-53-english")
    wave = np.zeros(16_000, dtype=np.float32)
    with pytest.raises(ValueError, match="16000 Hz.*44100"):
        enc.conditioning(wave, 44_100, 16)
    with pytest.raises(ValueError, match="mono"):
        enc.conditioning(np.zeros((16_000, 2), dtype=np.float32), 16_000, 16)
    with pytest.raises(ValueError, match="float"):
        enc.conditioning(np.zeros(16_000, dtype=np.int16), 16_000, 16)


def test_vae_layout_conversion_matches_diffusers_converter():
    model = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
    ours = model.state_dict()
    wan = diffusers_to_wan_vae(ours, num_res_blocks=2)
    theirs = convert_wan_vae_to_diffusers(dict(wan))  # diffusers' own single-file converter
    assert theirs.keys() == ours.keys()
    back = wan_to_diffusers_vae(wan)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_vae_encode_decode_shapes_and_tiling(tiny_checkpoint: Path):
    vae = WanVAE.from_checkpoint(tiny_checkpoint / VAE_CHECKPOINT)
    video = torch.rand(1, 3, 5, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 16, 2, 8, 8) and z.dtype == torch.float32
    x = vae.decode(z)
    assert x.shape == (1, 3, 5, 64, 64) and x.min() >= -1 and x.max() <= 1
    vae.enable_tiling(tile=(64, 64), stride=(48, 48))  # frames no larger than a tile: untouched
    assert torch.equal(vae.decode(z), x)
    vae.enable_tiling(tile=32, stride=24)
    tiled = vae.decode(z)
    # random weights make seams large, so only check the tiled path ran and kept shape and range
    assert tiled.shape == x.shape and tiled.abs().max() <= 1 and not torch.equal(tiled, x)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(video[..., :60])


def test_vae_still_encode_equals_the_whole_video_bit_for_bit(tiny_checkpoint: Path):
    # LiveAvatar's motion condition: one image repeated 365 times. The encoder's state stops
    # changing after a few chunks; the latents from there on must still be exactly encode()'s.
    vae = WanVAE.from_checkpoint(tiny_checkpoint / VAE_CHECKPOINT)
    image = torch.rand(1, 3, 1, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for frames in (1, 5, 9, 145):
        whole = vae.encode(image.expand(-1, -1, frames, -1, -1).contiguous())
        still = vae.encode_still(image, frames)
        assert still.shape == whole.shape and torch.equal(still, whole), frames
    assert vae.still_chunks < 1 + 144 // 4  # stopped early (22 of 37 chunks)
    other = image.clone()
    other[..., 0, 0] = 1.0  # a different image: different latents, nothing kept from the last call
    assert not torch.equal(vae.encode_still(other, 145), vae.encode_still(image, 145))
    with pytest.raises(ValueError, match="one frame"):
        vae.encode_still(image.expand(-1, -1, 2, -1, -1), 5)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode_still(image[..., :30], 5)
    vae.enable_tiling(tile=16, stride=12)  # tiled encodes take the whole video
    assert torch.equal(vae.encode_still(image, 9), vae.encode(image.expand(-1, -1, 9, -1, -1).contiguous()))


def test_vae_bad_file_names_it(tmp_path: Path):
    bad = tmp_path / VAE_CHECKPOINT
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        WanVAE.from_checkpoint(bad)


def test_scheduler_uses_the_reference_sigma_grid():
    for steps, res in ((40, "480p"), (40, "720p"), (3, "480p")):
        shift = shift_for(res)
        s = np.linspace(float(np.float32(0.999)), 0.0, steps + 1)[:-1]  # the reference: float64 grid
        shifted = shift * s / (1 + (shift - 1) * s)
        sched = make_scheduler(steps, shift)
        assert torch.equal(sched.timesteps, torch.from_numpy(shifted * 1000).to(torch.int64))
        assert torch.equal(sched.sigmas, torch.from_numpy(np.append(shifted, 0.0).astype(np.float32)))
    with pytest.raises(ValueError, match="1080p"):
        shift_for("1080p")


def test_text_encoder_keeps_one_token_embedding(text_encoder: TextEncoder) -> None:
    # Wan's checkpoint has one token embedding; two untied copies would cost 2 GiB on the GPU at full size.
    assert text_encoder.model.encoder.embed_tokens.weight is text_encoder.model.shared.weight
