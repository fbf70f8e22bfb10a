"""Block streaming (model/offload.py) and the pipeline's offload modes, on CPU.

The CUDA side (side-stream copies ordered by events, page-locked homes) runs on a GPU only; it is
measured in bench/pipeline_memory.py. Here the same bookkeeping runs with synchronous copies:
which block sits in which slot, where each tensor points, recovery from a failed forward, and
that streamed results equal resident ones exactly.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from media import gradient_image, voiced_tone

from model.config import S2VConfig
from model.offload import BlockStreamer, block_streamer, stream_blocks
from model.pipeline import S2VPipeline, offload_mode
from model.transformer import WanS2VTransformer


@pytest.fixture
def resident(tiny_dit: WanS2VTransformer) -> WanS2VTransformer:
    return tiny_dit


@pytest.fixture
def inputs_of(make_inputs):
    """(cfg, batch, seed) -> DiT inputs of a later clip, without a pose condition."""

    def build(cfg: S2VConfig, batch: int = 1, seed: int = 0) -> dict:
        inputs = make_inputs(cfg, batch=batch, seed=seed)
        inputs.pop("pose_latents")
        return inputs

    return build


def _inside(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    start = buffer.data_ptr()
    return start <= tensor.data_ptr() < start + buffer.numel()


@torch.no_grad()
def test_streamed_forwards_equal_resident_ones(resident: WanS2VTransformer, inputs_of):
    streamed = copy.deepcopy(resident)
    streamer = stream_blocks(streamed, "cpu")
    cfg = resident.config
    n = len(resident.blocks)
    for kwargs in ({}, {"drop_motion_frames": True}):  # later clip (motion tokens), first clip
        for batch in (1, 2):
            inputs = inputs_of(cfg, batch, seed=batch)
            assert torch.equal(streamed(**inputs, **kwargs), resident(**inputs, **kwargs))
    # every forward copies each block once, and the first block of the next one ahead of time
    assert streamer.bytes_copied == sum(h.numel() for h in streamer.homes) * 4 + streamer.homes[0].numel()
    # two slots of the largest block, whatever the model's depth
    assert streamer.slot_bytes == 2 * max(h.numel() for h in streamer.homes)
    # between forwards every block tensor points into its own home in the packed store
    for i, block in enumerate(streamed.blocks):
        for tensor in [*block.parameters(), *block.buffers()]:
            assert _inside(tensor, streamer.homes[i])
    assert streamer.host_bytes >= sum(p.numel() * p.element_size() for p in resident.blocks.parameters())
    theirs, ours = resident.state_dict(), streamed.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert n >= 3  # odd depth: block 0 and the last block share a slot across forwards
    streamer.remove()  # unhooked: the blocks run from their homes
    assert block_streamer(streamed) is None and torch.equal(streamed(**inputs), resident(**inputs))


@torch.no_grad()
def test_a_forward_that_fails_midway_leaves_the_streamer_usable(resident: WanS2VTransformer, inputs_of):
    streamed = copy.deepcopy(resident)
    streamer = stream_blocks(streamed, "cpu")
    inputs = inputs_of(resident.config)
    expected = resident(**inputs)

    def fail_once(module, args):
        handle.remove()
        raise RuntimeError("injected failure in block 1")

    handle = streamed.blocks[1].register_forward_pre_hook(fail_once)
    with pytest.raises(RuntimeError, match="injected failure"):
        streamed(**inputs)
    for i, block in enumerate(streamed.blocks):  # reset: everything home, no slot claimed
        assert all(_inside(p, streamer.homes[i]) for p in block.parameters())
    assert torch.equal(streamed(**inputs), expected)


def test_streaming_needs_two_slots_and_installs_once(resident: WanS2VTransformer):
    with pytest.raises(ValueError, match="at least 2 slots"):
        BlockStreamer(copy.deepcopy(resident).blocks, torch.device("cpu"), slots=1)
    streamed = copy.deepcopy(resident)
    stream_blocks(streamed, "cpu")
    with pytest.raises(ValueError, match="already streams"):
        stream_blocks(streamed, "cpu")


def test_offload_modes_are_named_and_checked():
    assert [offload_mode(v) for v in (False, None, True, "none", "blocks", "model")] == [
        "none", "none", "blocks", "none", "blocks", "model",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="expected one of none, blocks, model"):
        offload_mode("everything")


def test_attention_kernel_choice_fails_clearly_off_gpu(resident: WanS2VTransformer):
    model = copy.deepcopy(resident)
    with pytest.raises(ValueError, match="FA4 needs a CUDA GPU"):
        model.set_attention("fa4")
    with pytest.raises(ValueError, match="expected one of sdpa, fa4"):
        model.set_attention("flash9")
    model.set_attention("sdpa")
    assert model.attention == "sdpa"


def _clips(pipe: S2VPipeline) -> list:
    return list(
        pipe.generate_clips(gradient_image(), voiced_tone(1.2), "a person speaks", num_clips=2, infer_frames=8, steps=2)
    )


def test_every_offload_mode_renders_the_same_clips(tiny_checkpoint: Path):
    """offload none / blocks / model load from the same checkpoint and give bit-identical clips
    and continuation states (CPU, float32; CFG as a batch of 2 in all three, as "model" otherwise
    defaults to two passes, which differ by float rounding)."""
    outputs = {}
    for mode in ("none", "blocks", "model"):
        pipe = S2VPipeline.from_checkpoint(tiny_checkpoint, device="cpu", offload=mode, cfg_batch=True)
        assert pipe.offload == mode
        assert (block_streamer(pipe.transformer) is not None) == (mode == "blocks")
        assert pipe.transformer.attention == "sdpa"  # "auto" on a CPU
        outputs[mode] = _clips(pipe)
    for mode in ("blocks", "model"):
        for ref, got in zip(outputs["none"], outputs[mode], strict=True):
            assert np.array_equal(ref.frames, got.frames)
            assert ref.state.keys() == got.state.keys()
            assert all(np.array_equal(ref.state[k], got.state[k]) for k in ref.state)


def test_a_streamed_transformer_cannot_be_used_resident(tiny_checkpoint: Path):
    pipe = S2VPipeline.from_checkpoint(tiny_checkpoint, device="cpu", offload="blocks")
    with pytest.raises(ValueError, match="offload='blocks'"):
        S2VPipeline(pipe.transformer, pipe.text_encoder, pipe.audio_encoder, pipe.vae, device="cpu", offload=False)


def test_compiled_streamed_pipeline_matches_eager(tiny_checkpoint: Path):
    """compile_dit (the CUDA default) with streamed blocks: the same clips as eager up to the
    fusion's float rounding, and no recompilation per block or per step."""
    from torch._dynamo.utils import counters

    eager = _clips(S2VPipeline.from_checkpoint(tiny_checkpoint, device="cpu", offload="blocks"))
    counters.clear()
    pipe = S2VPipeline.from_checkpoint(tiny_checkpoint, device="cpu", offload="blocks", compile_dit=True)
    compiled = _clips(pipe)
    for ref, got in zip(eager, compiled, strict=True):
        assert np.abs(ref.frames.astype(int) - got.frames.astype(int)).max() <= 2
        assert np.allclose(ref.state["motion_frames"], got.state["motion_frames"], atol=1e-3)
    # one block graph per token layout (first clip, later clip), shared by the 3 blocks, and one
    # audio-injection graph shared by the injectors (its shapes do not depend on motion tokens)
    assert counters["stats"]["unique_graphs"] <= 3


def test_offload_defaults_favour_memory(tiny_checkpoint: Path):
    """With offload, CFG runs as two passes and frames above 480x832 decode in tiles (what let
    720p run under a 22 GiB cap); without, a batch of 2 and no tiling."""
    for mode, batch, tiling in (("none", True, False), ("blocks", False, True), ("model", False, True)):
        pipe = S2VPipeline.from_checkpoint(tiny_checkpoint, device="cpu", offload=mode)
        vae = pipe.vae.model
        assert (pipe.cfg_batch, vae.use_tiling) == (batch, tiling)
        if tiling:
            assert (vae.tile_sample_min_height, vae.tile_sample_min_width) == (480, 832)
