"""The S2V transformer: official parameter layout, forward shapes and conditioning paths, CFG as a
batch of 2, clear errors for inputs of the wrong shape, configuration files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from model.attention import _segment_positions, rope_table
from model.conditioning import official_injector_map
from model.config import S2VConfig
from model.transformer import WanS2VTransformer, randomize_


def test_14b_parameter_layout_matches_the_official_checkpoint() -> None:
    # The released index lists 1260 tensors: 1095 of the Wan2.x backbone, 165 of the S2V parts.
    with torch.device("meta"):
        model = WanS2VTransformer(S2VConfig.wan_14b())
    sd = model.state_dict()
    assert len(sd) == 1260
    expected = {
        "patch_embedding.weight": (5120, 16, 1, 2, 2),
        "text_embedding.0.weight": (5120, 4096),
        "time_projection.1.weight": (30720, 5120),
        "blocks.39.self_attn.norm_q.weight": (5120,),
        "blocks.0.norm3.bias": (5120,),
        "blocks.17.ffn.0.weight": (13824, 5120),
        "blocks.5.modulation": (1, 6, 5120),
        "head.head.weight": (64, 5120),
        "head.modulation": (1, 2, 5120),
        "cond_encoder.weight": (5120, 16, 1, 2, 2),
        "trainable_cond_mask.weight": (3, 5120),
        "casual_audio_encoder.weights": (1, 25, 1, 1),
        "casual_audio_encoder.encoder.conv1_local.conv.weight": (5120, 1024, 3),
        "casual_audio_encoder.encoder.conv1_global.conv.weight": (1280, 1024, 3),
        "casual_audio_encoder.encoder.conv2.conv.weight": (2560, 1280, 3),
        "casual_audio_encoder.encoder.conv3.conv.weight": (5120, 2560, 3),
        "casual_audio_encoder.encoder.final_linear.weight": (5120, 5120),
        "casual_audio_encoder.encoder.padding_tokens": (1, 1, 1, 5120),
        "audio_injector.injector.11.k.weight": (5120, 5120),
        "audio_injector.injector.11.norm_k.weight": (5120,),
        "audio_injector.injector_adain_layers.11.linear.weight": (10240, 5120),
        "frame_packer.proj.weight": (5120, 16, 1, 2, 2),
        "frame_packer.proj_2x.weight": (5120, 16, 2, 4, 4),
        "frame_packer.proj_4x.weight": (5120, 16, 4, 8, 8),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("motioner.", "zip_motion_out.")) for k in sd)
    assert sum(t.numel() for t in sd.values()) > 16e9


def test_forward_first_and_later_clip(tiny_dit: WanS2VTransformer, dit_inputs: dict) -> None:
    with torch.no_grad():
        later = tiny_dit(**dit_inputs)
        first = tiny_dit(**dit_inputs, drop_motion_frames=True)
        no_motion = tiny_dit(**{**dit_inputs, "motion_latents": None})
    assert later.shape == dit_inputs["latents"].shape == (1, 16, 2, 16, 16)
    assert later.dtype == torch.float32 and torch.isfinite(later).all()
    # motion tokens change the prediction; dropping them equals passing none
    assert (later - first).abs().max() > 1e-3
    torch.testing.assert_close(first, no_motion, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["audio", "pose_latents", "ref_latents", "context"])
def test_each_condition_reaches_the_output(tiny_dit: WanS2VTransformer, dit_inputs: dict, name: str) -> None:
    with torch.no_grad():
        base = tiny_dit(**dit_inputs)
        changed = tiny_dit(**{**dit_inputs, name: dit_inputs[name] * 0.0})
    assert (base - changed).abs().max() > 1e-4


def test_no_pose_equals_zero_pose(tiny_dit: WanS2VTransformer, dit_inputs: dict) -> None:
    with torch.no_grad():
        none = tiny_dit(**{**dit_inputs, "pose_latents": None})
        zeros = tiny_dit(**{**dit_inputs, "pose_latents": torch.zeros_like(dit_inputs["pose_latents"])})
    torch.testing.assert_close(none, zeros, rtol=1e-5, atol=1e-5)


def test_audio_injection_sees_each_frame_separately(tiny_dit: WanS2VTransformer, dit_inputs: dict) -> None:
    # Changing the audio of the last video frames only changes the last latent frame (causal encoder,
    # per-frame attention) - before self-attention mixes frames, i.e. in a one-layer model.
    cfg = tiny_dit.config
    audio = dit_inputs["audio"]
    glob, local = tiny_dit.encode_audio(audio)
    bumped = audio.clone()
    bumped[..., -2:] += 1.0
    glob2, local2 = tiny_dit.encode_audio(bumped)
    assert local.shape == (1, 2, cfg.num_audio_token + 1, cfg.dim) and glob.shape == (1, 2, 1, cfg.dim)
    torch.testing.assert_close(local[:, 0], local2[:, 0])
    assert (local[:, 1] - local2[:, 1]).abs().max() > 1e-4


def test_cfg_as_batch_of_two_equals_two_calls(tiny_dit: WanS2VTransformer, make_inputs) -> None:
    cfg = tiny_dit.config
    one = make_inputs(cfg, batch=1, seed=3)
    neg_context = torch.randn(1, 5, cfg.text_dim)
    pair = {
        **one,
        "latents": one["latents"].expand(2, -1, -1, -1, -1),
        "timestep": one["timestep"],  # batch 1 is shared
        "context": torch.cat([one["context"], torch.nn.functional.pad(neg_context, (0, 0, 0, 2))]),
        "audio": torch.cat([one["audio"], one["audio"] * 0]),
    }
    with torch.no_grad():
        both = tiny_dit(**pair)
        cond = tiny_dit(**one)
        uncond = tiny_dit(**{**one, "context": neg_context, "audio": one["audio"] * 0})
    torch.testing.assert_close(both[0:1], cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1:2], uncond, rtol=1e-5, atol=1e-5)


def test_compiled_forward_equals_eager_with_one_graph_per_kind(tiny_config: S2VConfig, make_inputs) -> None:
    """compile_blocks compiles the blocks and the audio injections: the same velocity as eager,
    with one block graph and one injection graph shared by all blocks and all injectors."""
    from torch._dynamo.utils import counters

    cfg = dataclasses.replace(tiny_config, num_layers=6, audio_inject_layers=(0, 2, 3, 5))
    torch.manual_seed(0)
    model = randomize_(WanS2VTransformer(cfg), seed=1).eval().requires_grad_(False)
    inputs = make_inputs(cfg, seed=4)
    with torch.no_grad():
        eager = model(**inputs)
        counters.clear()
        model.compile_blocks(dynamic=False)
        compiled = model(**inputs)
        again = model(**inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert torch.equal(compiled, again)
    assert counters["stats"]["unique_graphs"] == 2


def test_timestep_zero_for_reference_tokens(tiny_config: S2VConfig, make_inputs) -> None:
    # Without zero_timestep the reference/motion tokens are modulated with t too: outputs differ.
    torch.manual_seed(0)
    a = WanS2VTransformer(tiny_config).eval()
    b = WanS2VTransformer(dataclasses.replace(tiny_config, zero_timestep=False)).eval()
    b.load_state_dict(a.state_dict())
    inputs = make_inputs(tiny_config)
    with torch.no_grad():
        assert (a(**inputs) - b(**inputs)).abs().max() > 1e-5


@pytest.mark.parametrize(
    ("name", "bad", "words"),
    [
        ("latents", torch.zeros(1, 8, 2, 16, 16), "latents: expected [B, 16, F, H, W]"),
        ("latents", torch.zeros(1, 16, 2, 15, 16), "multiples of the patch size"),
        ("ref_latents", torch.zeros(1, 16, 1, 8, 16), "ref_latents: expected [1 or 1, 16, 1, 16, 16]"),
        ("context", torch.zeros(1, 7, 31), "context: expected [1 or 1, L, 32]"),
        ("context", torch.zeros(1, 33, 32), "more than text_len 32"),
        ("audio", torch.zeros(1, 25, 32, 12), "give 3 latent frames but latents have 2"),
        ("audio", torch.zeros(1, 24, 32, 8), "audio: expected [1 or 1, 25, 32, T]"),
        ("pose_latents", torch.zeros(1, 16, 3, 16, 16), "pose_latents: expected [1 or 1, 16, 2, 16, 16]"),
        ("motion_latents", torch.zeros(1, 16, 19, 16, 8), "motion_latents: expected [1 or 1, 16, T_m, 16, 16]"),
        ("timestep", torch.zeros(3), "timestep: expected a scalar or [1]"),
        ("add_last_motion", 3, "add_last_motion: expected 0, 1 or 2"),
    ],
)
def test_wrong_input_shapes_raise_clear_errors(
    tiny_dit: WanS2VTransformer, dit_inputs: dict, name: str, bad: object, words: str
) -> None:
    with pytest.raises(ValueError) as err:
        tiny_dit(**{**dit_inputs, name: bad})
    assert words in str(err.value)


def test_batch_mismatch_is_an_error(tiny_dit: WanS2VTransformer, make_inputs) -> None:
    inputs = make_inputs(tiny_dit.config, batch=2)
    with pytest.raises(ValueError, match=r"audio: expected \[2 or 1"):
        tiny_dit(**{**inputs, "audio": torch.cat([inputs["audio"]] * 3)})


def test_clip_frame_arithmetic() -> None:
    cfg = S2VConfig.wan_14b()
    assert cfg.lat_motion_frames == 19 and cfg.latent_frames(80) == 20
    with torch.device("meta"):
        model = WanS2VTransformer(cfg)
    assert model.audio_latent_frames(80) == 20


def test_rope_positions_follow_the_reference() -> None:
    # FramePack grids of a 60x104 latent (480x832): newest frame at -1, 2x at -3, 4x at -19..-4
    pf, ph, pw = _segment_positions((-1, 0, 0), (0, 30, 52), (1, 30, 52))
    assert pf.tolist() == [-1] and ph.tolist() == list(range(30))
    pf, ph, _ = _segment_positions((-3, 0, 0), (-2, 15, 26), (2, 30, 52))
    assert pf.tolist() == [-3] and ph.tolist() == np.linspace(0, 29, 15).astype(int).tolist()
    pf, ph, _ = _segment_positions((-19, 0, 0), (-15, 7, 13), (16, 30, 52))
    assert pf.tolist() == [-19, -14, -9, -4] and ph[-1] == 29
    pf, _, _ = _segment_positions((30, 0, 0), (31, 30, 52), (1, 30, 52))
    assert pf.tolist() == [30]
    # frame position p rotates the first pairs by p * 10000^0 = p radians; negative ones backwards
    table = rope_table(128, [((-19, 0, 0), (-15, 1, 1), (16, 2, 2))])
    assert table.shape == (4, 1, 128, 2) and table.dtype == torch.float32
    # per channel (cos, signed sin): both channels of a pair share the angle, the even one negated
    torch.testing.assert_close(table[..., 0::2, 0], table[..., 1::2, 0])
    torch.testing.assert_close(table[..., 0::2, 1], -table[..., 1::2, 1])
    angles = torch.atan2(table[:, 0, 1, 1], table[:, 0, 1, 0])
    expected = torch.tensor([-19.0, -14.0, -9.0, -4.0])
    torch.testing.assert_close(torch.remainder(angles - expected + np.pi, 2 * np.pi), torch.full((4,), np.pi))


def test_injector_map_replicates_the_reference_naming() -> None:
    assert official_injector_map(S2VConfig.wan_14b()) == (
        12,
        {i: n for n, i in enumerate(S2VConfig().audio_inject_layers)},
    )
    # the reference matches block names by substring: id 1 also hits blocks 10 and 11
    cfg = dataclasses.replace(S2VConfig.tiny(), num_layers=12, audio_inject_layers=(1,))
    assert official_injector_map(cfg) == (3, {1: 2})


def test_config_json_round_trip_and_official_keys(tmp_path) -> None:
    cfg = S2VConfig.tiny()
    cfg.to_json(tmp_path / "config.json")
    assert S2VConfig.from_json(tmp_path / "config.json") == cfg
    official = {
        "_class_name": "WanModel_S2V",
        "_diffusers_version": "0.33.1",
        "adain_mode": "attn_norm",
        "add_last_motion": True,
        "audio_dim": 1024,
        "audio_inject_layers": [0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39],
        "cond_dim": 16,
        "dim": 5120,
        "enable_adain": True,
        "enable_framepack": True,
        "enable_motioner": False,
        "enable_tsm": False,
        "eps": 1e-06,
        "ffn_dim": 13824,
        "framepack_drop_mode": "padd",
        "freq_dim": 256,
        "in_dim": 16,
        "model_type": "s2v",
        "motion_token_num": 1024,
        "num_audio_token": 4,
        "num_heads": 40,
        "num_layers": 40,
        "out_dim": 16,
        "text_len": 512,
        "trainable_token": False,
        "zero_init": True,
        "zero_timestep": True,
        "some_future_key": 3,
    }
    (tmp_path / "official.json").write_text(json.dumps(official))
    loaded = S2VConfig.from_json(tmp_path / "official.json")
    assert loaded == S2VConfig.wan_14b()
    assert loaded.extra == {"some_future_key": 3}


def test_config_rejects_what_the_code_does_not_implement() -> None:
    with pytest.raises(ValueError, match="enable_motioner"):
        S2VConfig(enable_motioner=True)
    with pytest.raises(ValueError, match="num_heads"):
        S2VConfig(dim=100, num_heads=3)
    with pytest.raises(ValueError, match="enable_framepack=False"):
        S2VConfig(enable_framepack=False)
    with pytest.raises(ValueError, match="audio_inject_layers"):
        S2VConfig(num_layers=4, audio_inject_layers=(0, 4))


def test_add_last_motion_zeroes_the_newest_frames_in_padd_mode(tiny_dit: WanS2VTransformer, dit_inputs: dict) -> None:
    # 'padd' (the release): add_last_motion=1 hides the newest motion frame, 0 the newest three
    motion = dit_inputs["motion_latents"]
    with torch.no_grad():
        for level, hidden in ((1, 1), (0, 3)):
            zeroed = motion.clone()
            zeroed[:, :, -hidden:] = 0
            got = tiny_dit(**dit_inputs, add_last_motion=level)
            want = tiny_dit(**{**dit_inputs, "motion_latents": zeroed}, add_last_motion=2)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_framepack_drop_mode_drops_tokens_and_their_grids(tiny_config: S2VConfig) -> None:
    cfg = dataclasses.replace(tiny_config, framepack_drop_mode="drop")
    packer = WanS2VTransformer(cfg).frame_packer
    motion = torch.randn(1, 16, 19, 16, 16)
    sizes = {2: 8 * 8 + 4 * 4 + 4 * 2 * 2, 1: 4 * 4 + 4 * 2 * 2, 0: 4 * 2 * 2}
    for level, tokens in sizes.items():
        assert packer(motion, level).shape[1] == tokens
        assert rope_table(32, packer.segments(16, 16, level)).shape[0] == tokens
