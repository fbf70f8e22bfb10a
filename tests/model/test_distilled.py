"""Distilled mode (LiveAvatar's causal S2V model, model/causal.py and model/distilled.py) on tiny
weights: the cached attention against plain masked attention, the per-step rings, stale cache
contents, the reference's moving RoPE position, the LoRA's strict matching, and the streaming
loop's clips and exact resume. Parity with LiveAvatar's own code: bench/parity_liveavatar.py."""

from __future__ import annotations

import gc
import itertools
import logging
import random
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from media import gradient_image, voiced_tone
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

from model.attention import apply_rope, attend, attend_lse, merge_attention, rope_table
from model.causal import FRAMES_PER_BLOCK, CausalS2V, StreamCache, reference_shift
from model.conditioning import audio_injection
from model.config import S2VConfig
from model.distilled import DistilledPipeline, check_liveavatar_lora, distilled_schedule, read_liveavatar_lora
from model.lora import LoraError, load_lora, set_loras
from model.tiny import write_liveavatar_lora
from model.transformer import WanS2VTransformer, randomize_

HW = (8, 8)  # latent frames of 8 x 8: 16 tokens a frame, 48 a block (FramePack needs 8 x 8)


@pytest.fixture(scope="module")
def causal(tiny_config: S2VConfig) -> CausalS2V:
    return CausalS2V(randomize_(WanS2VTransformer(tiny_config), seed=3).float().eval().requires_grad_(False))


def _inputs(cfg: S2VConfig, blocks: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "latents": [torch.randn(1, cfg.in_dim, FRAMES_PER_BLOCK, *HW, generator=gen) for _ in range(blocks)],
        "audio": [torch.randn(1, cfg.audio_num_layers, cfg.audio_dim, 12, generator=gen) for _ in range(blocks)],
        "ref": torch.randn(1, cfg.in_dim, 1, *HW, generator=gen),
        "motion": torch.randn(1, cfg.in_dim, cfg.lat_motion_frames, *HW, generator=gen),
        "context": torch.randn(1, 7, cfg.text_dim, generator=gen),
    }


def _stream(causal: CausalS2V, inputs: dict, cache: StreamCache, steps: int, override=None) -> dict:
    """Run every block at every step on the given latents (no sampling); {(block, step): velocity}."""
    model = causal.model
    ctx = model.text_context(inputs["context"], 1)
    causal.prefill(cache, inputs["ref"], inputs["motion"], ctx)
    out = {}
    for n, (latents, audio) in enumerate(zip(inputs["latents"], inputs["audio"], strict=True)):
        for i in range(steps):
            x = override.get((n, i), latents) if override else latents
            t = torch.tensor([900.0 - 200 * i])
            out[n, i] = causal.forward_block(cache, x, t, ctx, audio, block=n, step=i, shift=n % 5)
    return out


def test_cached_attention_equals_masked_full_attention(tiny_dit: WanS2VTransformer) -> None:
    # One self-attention layer, 5 blocks through a ring of 2 (so it wraps twice) plus 7 condition
    # tokens: each block's output equals plain attention over all tokens at once with the mask
    # "the condition tokens, the block itself and the block before".
    cfg = tiny_dit.config
    attn = tiny_dit.blocks[0].self_attn
    block_tokens, blocks, window, n_cond = 6, 5, 2, 7
    cache = StreamCache(tiny_dit, steps=1, window=window, block_tokens=block_tokens, cond_tokens=n_cond, device="cpu")
    gen = torch.Generator().manual_seed(1)
    cond_x = torch.randn(1, n_cond, cfg.dim, generator=gen)
    x = torch.randn(1, blocks * block_tokens, cfg.dim, generator=gen)
    angles = [((0, 0, 0), (1, 1, n_cond), (1, 1, n_cond))]
    cond_rope = rope_table(cfg.head_dim, angles)
    rope = rope_table(cfg.head_dim, [((5, 0, 0), (5 + blocks, 1, block_tokens), (blocks, 1, block_tokens))])
    with torch.no_grad():
        attn(cond_x, rope=cond_rope, kv_cache=cache.prefill_hooks[0])
        cached = []
        for n in range(blocks):
            cache.seek([(n, 0)], [cond_rope])
            part = slice(n * block_tokens, (n + 1) * block_tokens)
            cached.append(attn(x[:, part], rope=rope[part], kv_cache=cache.stream_hooks[0]))
        cached = torch.cat(cached, dim=1)

        b, s, h = 1, blocks * block_tokens, cfg.num_heads
        q = apply_rope(attn.norm_q(attn.q(x)).view(b, s, h, -1), rope)
        k = apply_rope(attn.norm_k(attn.k(x)).view(b, s, h, -1), rope)
        v = attn.v(x).view(b, s, h, -1)
        k_cond = apply_rope(attn.norm_k(attn.k(cond_x)).view(b, n_cond, h, -1), cond_rope)
        v_cond = attn.v(cond_x).view(b, n_cond, h, -1)
        block_of = torch.arange(s) // block_tokens
        seen = (block_of[None, :] <= block_of[:, None]) & (block_of[None, :] > block_of[:, None] - window)
        mask = torch.cat([torch.ones(s, n_cond, dtype=torch.bool), seen], dim=1)
        keys, values = torch.cat([k_cond, k], 1), torch.cat([v_cond, v], 1)
        full = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask
        )
        full = attn.o(full.transpose(1, 2).reshape(b, s, -1))
    assert torch.allclose(cached, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_two_key_sets_attended_apart_and_merged_equal_one_attention(dtype: torch.dtype, tol: float) -> None:
    # the stream hook's attention: ring and condition keys apart, softmaxes merged by log-sum-exp
    gen = torch.Generator().manual_seed(4)
    q, k1, v1, k2, v2 = (
        (torch.randn(2, n, 3, 16, generator=gen) * 2).to(dtype) for n in (10, 23, 23, 9, 9)
    )
    out = torch.empty_like(q)
    merge_attention(*attend_lse(q, k1, v1, "sdpa"), *attend_lse(q, k2, v2, "sdpa"), out=out)
    whole = attend(q.float(), torch.cat([k1, k2], 1).float(), torch.cat([v1, v2], 1).float())
    assert out.dtype == dtype
    assert (out.float() - whole).abs().max() <= tol * whole.abs().max()


def test_each_step_sees_only_its_own_ring(causal: CausalS2V) -> None:
    cfg = causal.config
    inputs = _inputs(cfg, blocks=2)
    new_cache = lambda: causal.new_cache(steps=2, window=4, lat_h=HW[0], lat_w=HW[1], device="cpu")  # noqa: E731
    base = _stream(causal, inputs, new_cache(), steps=2)
    other = torch.randn(inputs["latents"][0].shape, generator=torch.Generator().manual_seed(9))
    changed = _stream(causal, inputs, new_cache(), steps=2, override={(0, 1): other})
    assert torch.equal(changed[1, 0], base[1, 0])  # step 0 never saw block 0's step-1 input
    assert not torch.allclose(changed[1, 1], base[1, 1])  # step 1 did
    assert torch.equal(changed[0, 0], base[0, 0])


def test_stale_cache_contents_are_never_read(causal: CausalS2V) -> None:
    # A cache reused for the next segment is not cleared: only slots written in this segment are read.
    cfg = causal.config
    inputs = _inputs(cfg, blocks=3, seed=4)
    cache = causal.new_cache(steps=2, window=2, lat_h=HW[0], lat_w=HW[1], device="cpu")
    clean = _stream(causal, inputs, cache, steps=2)
    for tensors in (cache.ring_k, cache.ring_v, cache.cond_k, cache.cond_v):
        for t in tensors:
            t.fill_(float("nan"))
    again = _stream(causal, inputs, cache, steps=2)
    assert all(torch.equal(again[key], clean[key]) for key in clean)
    assert all(torch.isfinite(v).all() for v in again.values())


def test_the_window_forgets_old_blocks(causal: CausalS2V) -> None:
    # With a ring of 2 blocks, block 2 attends to blocks 1 and 2 only: another block 0 changes it
    # only through block 1 (whose keys saw block 0), so with a ring of 1 nothing before counts.
    cfg = causal.config
    inputs = _inputs(cfg, blocks=3, seed=5)
    other = _inputs(cfg, blocks=3, seed=6)["latents"][0]
    ring_of = lambda w: causal.new_cache(steps=1, window=w, lat_h=HW[0], lat_w=HW[1], device="cpu")  # noqa: E731
    one = _stream(causal, inputs, ring_of(1), steps=1)
    one_changed = _stream(causal, inputs, ring_of(1), steps=1, override={(0, 0): other})
    assert torch.equal(one[2, 0], one_changed[2, 0]) and torch.equal(one[1, 0], one_changed[1, 0])
    two = _stream(causal, inputs, ring_of(2), steps=1)
    two_changed = _stream(causal, inputs, ring_of(2), steps=1, override={(0, 0): other})
    assert not torch.allclose(two[1, 0], two_changed[1, 0])


def test_compiled_blocks_serve_the_causal_forwards_without_recompiling(causal: CausalS2V) -> None:
    # A worker's DiT is compiled for exact mode (the CUDA default); the causal forwards run those
    # compiled blocks, their cache hooks outside the graphs: one graph per (rows, filled ring)
    # layout shared by every layer, none made again for the next segment.
    model = causal.model
    inputs = _inputs(causal.config, blocks=3, seed=8)
    new_cache = lambda: causal.new_cache(steps=1, window=2, lat_h=HW[0], lat_w=HW[1], device="cpu")  # noqa: E731
    plain = _stream(causal, inputs, new_cache(), steps=1)
    torch._dynamo.reset()
    model.compile_blocks()
    try:
        compiled = _stream(causal, inputs, new_cache(), steps=1)
        graphs = counters["stats"]["unique_graphs"]
        again = _stream(causal, inputs, new_cache(), steps=1)
        assert counters["stats"]["unique_graphs"] == graphs
        assert all(torch.equal(again[k], compiled[k]) for k in plain)
        for k in plain:  # float32: the fused kernels round differently, no more
            assert (compiled[k] - plain[k]).norm() <= 1e-5 * plain[k].norm(), k
    finally:  # the fixture stays uncompiled for the other tests
        for block in model.blocks:
            block._compiled_call_impl = None
        model._audio_injection = audio_injection
        torch._dynamo.reset()


def test_a_finished_cache_is_freed_at_once(causal: CausalS2V) -> None:
    # 60 GiB at 480p: held by a reference cycle until Python's cyclic collector ran, a segment's
    # cache was still allocated when the next segment of the same process made its own (OOM).
    inputs = _inputs(causal.config, blocks=2, seed=5)
    cache = causal.new_cache(steps=2, window=2, lat_h=HW[0], lat_w=HW[1], device="cpu")
    _stream(causal, inputs, cache, steps=2)
    gone, ring = weakref.ref(cache), weakref.ref(cache.ring_k[0])
    collecting = gc.isenabled()
    gc.disable()
    try:
        del cache
        assert gone() is None and ring() is None
    finally:
        if collecting:
            gc.enable()


def test_reference_rope_moves_ahead_of_the_block() -> None:
    rng = random.Random(7)
    assert all(reference_shift(0, rng) == 0 for _ in range(50))  # early blocks: the reference stays at 30
    for first in (300, 3000, 44000):
        for _ in range(50):
            lead = 30 + reference_shift(first, rng) - first
            assert 4 <= lead <= 30
    a, b = random.Random(11), random.Random(11)
    assert [reference_shift(600, a) for _ in range(20)] == [reference_shift(600, b) for _ in range(20)]


def test_rope_tables_rounded_like_liveavatar() -> None:
    seg = [((41, 0, 0), (44, 2, 2), (3, 2, 2))]
    exact = rope_table(128, seg, max_position=45000)
    half = rope_table(128, seg, max_position=45000, dtype=torch.float16)
    assert torch.equal(half, exact.half().float()) and not torch.equal(half, exact)
    with pytest.raises(ValueError, match="1024-entry"):
        rope_table(128, seg[:0] + [((2000, 0, 0), (2001, 1, 1), (1, 1, 1))])


def test_schedule_is_livavatars_four_euler_steps() -> None:
    timesteps, sigmas = distilled_schedule()
    assert timesteps.shape == (4,) and sigmas.shape == (5,) and sigmas[-1] == 0
    assert timesteps[0] == 1000 and torch.allclose(timesteps, sigmas[:-1] * 1000)
    assert torch.all(sigmas[1:] < sigmas[:-1])


# ---------------------------------------------------------------------------------------------
# the LoRA


def test_lora_applies_w_plus_half_up_down_and_comes_off_exactly(tiny_config: S2VConfig, tmp_path: Path) -> None:
    path = write_liveavatar_lora(tmp_path / "la.safetensors", tiny_config, rank=4, seed=2)
    model = randomize_(WanS2VTransformer(tiny_config), seed=1).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = read_liveavatar_lora(path, model)
    assert len(lora.deltas) == 3 * 10 + 2 * 4  # 3 blocks x 10 linears, 2 audio injectors x 4
    set_loras(model, [(lora, 1.0)])
    tensors = load_file(str(path))
    name = "audio_injector.injector.1.v"
    up, down = tensors[f"{name}.lora_B.default.weight"], tensors[f"{name}.lora_A.default.weight"]
    want = before[f"{name}.weight"] + 64.0 / 4 * (up @ down)  # LiveAvatar's alpha 64 over the rank
    assert torch.allclose(model.state_dict()[f"{name}.weight"], want, atol=1e-6)
    assert torch.equal(model.state_dict()["blocks.0.norm3.weight"], before["blocks.0.norm3.weight"])
    set_loras(model, [])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_lora_key_spellings_accepted_and_never_detected_as_liveavatar(tiny_config: S2VConfig, tmp_path: Path) -> None:
    tensors = load_file(str(write_liveavatar_lora(tmp_path / "a.safetensors", tiny_config)))
    with torch.device("meta"):
        model = WanS2VTransformer(tiny_config)
    for prefix, infix in (("base_model.model.", ".default"), ("", "")):
        renamed = {prefix + k.replace(".default", infix): v for k, v in tensors.items()}
        save_file(renamed, tmp_path / "b.safetensors")
        assert len(read_liveavatar_lora(tmp_path / "b.safetensors", model).deltas) * 2 == len(tensors)
    # without asking for it, the same keys read as a DiffSynth LoRA (scale 1, as DiffSynth applies them)
    assert load_lora(tmp_path / "a.safetensors", model).style == "diffsynth"


def test_lora_for_another_model_is_refused_by_name(tiny_config: S2VConfig, tmp_path: Path) -> None:
    tensors = load_file(str(write_liveavatar_lora(tmp_path / "a.safetensors", tiny_config)))
    cases = {
        "match no layer": {**tensors, "blocks.0.self_attn.qkv.lora_A.default.weight": torch.zeros(4, 64)},
        "does not fit": {**tensors, "blocks.2.ffn.2.lora_A.default.weight": torch.zeros(4, 32)},
        "does not adapt": {
            **tensors,
            "text_embedding.0.lora_A.default.weight": torch.zeros(4, 32),
            "text_embedding.0.lora_B.default.weight": torch.zeros(64, 4),
        },
        "not LiveAvatar's": {k: v for k, v in tensors.items() if "audio_injector" not in k},  # a T2V-style LoRA
        "only one of the two": {k: v for k, v in tensors.items() if k != "blocks.1.cross_attn.o.lora_B.default.weight"},
    }
    for message, content in cases.items():
        path = tmp_path / "bad.safetensors"
        save_file(content, str(path))
        with pytest.raises(LoraError, match=message) as err:
            check_liveavatar_lora(path, tiny_config)
        assert str(path) in str(err.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="unreadable"):
        check_liveavatar_lora(tmp_path / "junk.safetensors", tiny_config)
    with pytest.raises(LoraError, match="does not exist"):
        check_liveavatar_lora(tmp_path / "missing.safetensors", tiny_config)
    with pytest.raises(LoraError, match="does not fit"):  # a tiny LoRA for the 14B
        check_liveavatar_lora(tmp_path / "a.safetensors")


# ---------------------------------------------------------------------------------------------
# the pipeline

INFER = 24  # 6 latent frames: 2 blocks a clip, a ring of 2


@pytest.fixture(scope="module")
def distilled(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> DistilledPipeline:
    lora = write_liveavatar_lora(tmp_path_factory.mktemp("lora") / "liveavatar.safetensors", S2VConfig.tiny())
    return DistilledPipeline.from_checkpoint(tiny_checkpoint, lora, device="cpu")


def test_clips_state_and_exact_resume(distilled: DistilledPipeline, caplog: pytest.LogCaptureFixture) -> None:
    image, audio = gradient_image(), voiced_tone(3.0)
    run = lambda **kw: list(distilled.generate_clips(image, audio, "a person talks", infer_frames=INFER, seed=5, **kw))  # noqa: E731
    clips = run(num_clips=3)
    assert [c.frames.shape for c in clips] == [(INFER - 3, 64, 64, 3), (INFER, 64, 64, 3), (INFER, 64, 64, 3)]
    assert all(c.frames.std() > 0 for c in clips)
    state = clips[1].state
    assert int(state["next_clip"]) == 2 and state["tail_latents"].shape == (16, 3, 8, 8)
    resumed = run(num_clips=3, start_clip=2, state=state)
    assert [c.index for c in resumed] == [2]
    assert np.array_equal(resumed[0].frames, clips[2].frames)
    for key in clips[2].state:
        assert np.array_equal(resumed[0].state[key], clips[2].state[key])

    # block by block (LiveAvatar's single-GPU order) is the same maths as the pipelined default
    sequential = distilled.generate_clips(
        image, audio, "a person talks", infer_frames=INFER, seed=5, num_clips=3, pipelined=False
    )
    for a, b in zip(itertools.islice(sequential, 2), clips[:2], strict=True):
        assert np.allclose(a.state["tail_latents"], b.state["tail_latents"], rtol=1e-4, atol=1e-5)

    # a state written elsewhere (here: altered) is reported, and the run continues from the replay
    altered = {**state, "tail_latents": state["tail_latents"] + 1e-3}
    with caplog.at_level(logging.WARNING, logger="model.distilled"):
        out = run(num_clips=3, start_clip=2, state=altered)
    assert len(out) == 1 and "replayed clip 1 differs" in caplog.text


def test_clips_handed_over_a_forward_later_are_the_same_clips(distilled: DistilledPipeline) -> None:
    # Clips are handed over after the next forward is queued (on CUDA the GPU runs on meanwhile);
    # with offload="model" (DiT and VAE taking turns on the GPU) each is handed over at once. Same
    # frames, states and order either way.
    image, audio = gradient_image(), voiced_tone(3.0)
    run = lambda: list(distilled.generate_clips(image, audio, "hi", infer_frames=INFER, seed=6, num_clips=3))  # noqa: E731
    later = run()
    distilled.offload = "model"
    try:
        at_once = run()
    finally:
        distilled.offload = "none"
    assert [c.index for c in later] == [c.index for c in at_once] == [0, 1, 2]
    for a, b in zip(later, at_once, strict=True):
        assert a.frames.dtype == b.frames.dtype == np.uint8 and np.array_equal(a.frames, b.frames)
        assert a.state.keys() == b.state.keys() and all(np.array_equal(a.state[k], b.state[k]) for k in a.state)


def test_the_vae_runs_in_the_dits_dtype_as_liveavatars(
    tiny_checkpoint: Path, distilled: DistilledPipeline, tmp_path: Path
) -> None:
    # LiveAvatar builds its VAE in the DiT's dtype (bf16); ours runs under autocast, so the float32
    # weights exact mode decodes with stay as they are. A float32 DiT keeps a float32 VAE.
    lora = write_liveavatar_lora(tmp_path / "liveavatar.safetensors", S2VConfig.tiny())
    bf16 = DistilledPipeline.from_checkpoint(tiny_checkpoint, lora, device="cpu", dtype=torch.bfloat16)
    image = gradient_image()
    pixels = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0) * 2 - 1
    frames = pixels[None, :, None].expand(1, 3, 5, *pixels.shape[1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = bf16.vae.encode(frames)[:, :, 1:].float()
    ref_bf16, _ = bf16.reference_latents(image)
    ref_f32, _ = distilled.reference_latents(image)
    assert torch.equal(ref_bf16, expected) and ref_bf16.dtype == torch.float32
    assert torch.equal(ref_f32, distilled.vae.encode(frames)[:, :, 1:])
    assert not torch.equal(ref_bf16, ref_f32) and torch.allclose(ref_bf16, ref_f32, atol=0.1)
    assert all(p.dtype == torch.float32 for p in bf16.vae.model.parameters())
    clip = next(bf16.generate_clips(image, voiced_tone(1.5), "hi", infer_frames=INFER, seed=1, num_clips=1))
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (INFER - 3, 64, 64, 3)


def test_settings_it_cannot_honour_fail_clearly(distilled: DistilledPipeline) -> None:
    image, audio = gradient_image(), voiced_tone(1.0)
    cases = [
        ({"guidance": 4.5}, "no classifier-free guidance"),
        ({"negative_prompt": "blurry"}, "no classifier-free guidance"),
        ({"infer_frames": 16}, "multiple of 12"),
        ({"start_clip": 1}, "needs the state"),
    ]
    for kwargs, message in cases:
        args = {"num_clips": 2, "infer_frames": INFER, **kwargs}
        with pytest.raises(ValueError, match=message):
            next(distilled.generate_clips(image, audio, "p", **args))
