"""Ulysses sequence parallelism (model/parallel.py) on CPU: 2 and 4 gloo processes give the
single-process forward and the single-process clip within float32 rounding."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from media import gradient_image, voiced_tone

from model.config import S2VConfig
from model.parallel import check_heads, parallel_groups, parallelize, sequence_parallel, shard_bounds
from model.transformer import WanS2VTransformer, randomize_

RTOL = 1e-5
INFER = 8  # video frames per clip, as tests/model/test_pipeline.py


def _config() -> S2VConfig:
    """The tiny architecture with 4 heads of 32 (the tiny config's 2 heads split over 2 ranks only)."""
    return dataclasses.replace(S2VConfig.tiny(), dim=128, ffn_dim=256, num_heads=4)


def _model() -> WanS2VTransformer:
    torch.manual_seed(0)  # the default init draws from the global generator
    return randomize_(WanS2VTransformer(_config()), seed=0).float().eval().requires_grad_(False)


def _cases(make_inputs) -> dict[str, dict]:
    """A later clip as a CFG batch of 2 and a first clip, on a 16 x 12 latent grid: 48 tokens a
    latent frame, so shards of 4 ranks cut frames in the middle."""
    later = make_inputs(_config(), batch=2, frames=2, hw=(16, 12), seed=1)
    first = {**make_inputs(_config(), batch=1, frames=2, hw=(16, 12), seed=2), "drop_motion_frames": True}
    return {"later": later, "first": first}


def _join(rank: int, world: int, port: int) -> None:
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)


def _forward_worker(rank: int, world: int, port: int, cases: dict, out: str) -> None:
    torch.set_num_threads(1)
    _join(rank, world, port)
    try:
        model = _model()
        sequence_parallel(model)
        with torch.no_grad():
            results = {name: model(**inputs) for name, inputs in cases.items()}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _clip_worker(rank: int, world: int, port: int, checkpoint: str, kwargs: dict, cfg: bool, out: str) -> None:
    """Two clips on this rank: sequence parallel over the world, or with `cfg` CFG parallel too."""
    from model.pipeline import S2VPipeline  # here: the forward workers skip importing it

    torch.set_num_threads(1)
    _join(rank, world, port)
    try:
        pipe = S2VPipeline.from_checkpoint(checkpoint, device="cpu")
        parallelize(pipe, parallel_groups(cfg=cfg))
        branch = pipe.cfg_parallel.branch if cfg else None
        clips, velocities = _render(pipe, kwargs)
        # tensors only, so the test reads it back with weights_only=True
        clips = [(torch.from_numpy(f), {k: torch.from_numpy(v) for k, v in s.items()}) for f, s in clips]
        torch.save((branch, (clips, velocities)), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _render(pipe, kwargs: dict) -> tuple[list, list]:
    """The clips' (frames, state) and every DiT output on the way (the velocities of each step)."""
    velocities = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, out: velocities.append(out.clone()))
    try:
        clips = list(pipe.generate_clips(gradient_image(), voiced_tone(1.0), "a person talks", **kwargs))
    finally:
        hook.remove()
    return [(c.frames, c.state) for c in clips], velocities


def _spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, port, *args) in `world` fresh processes joined through a TCP store on a
    free loopback port (the store lives here, so no two runs race for a port)."""
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, timeout=timedelta(seconds=60), wait_for_workers=False)
    mp.spawn(fn, args=(world, store.port, *args), nprocs=world, join=True)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * want.abs().max().item())


def _load_rank(path: Path) -> tuple[int, tuple[list, list]]:
    """A clip worker's (branch, (clips, velocities)), the clips back as numpy (frames, state)."""
    branch, (clips, velocities) = torch.load(path, weights_only=True)
    return branch, ([(f.numpy(), {k: v.numpy() for k, v in s.items()}) for f, s in clips], velocities)


def _similar_clips(got: list, want: list) -> None:
    """The same clips, pixels within a few uint8 levels: the decoded frames pass through the tiny
    random VAE, which magnifies float32 rounding (one thread instead of two moves the second
    clip's carried frames by ~2e-2 on its own)."""
    assert len(got) == len(want)
    for (frames, state), (w_frames, w_state) in zip(got, want, strict=True):
        assert frames.shape == w_frames.shape and state.keys() == w_state.keys()
        diff = np.abs(frames.astype(int) - w_frames.astype(int))
        assert diff.max() <= 8 and diff.mean() < 0.05


@pytest.mark.parametrize("world", [2, 4])
def test_forward_equals_one_process(world: int, make_inputs, tmp_path: Path) -> None:
    cases = _cases(make_inputs)
    model = _model()
    with torch.no_grad():
        want = {name: model(**inputs) for name, inputs in cases.items()}
    _spawn(_forward_worker, world, cases, str(tmp_path))
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name in cases:
            _close(got[name], want[name])
    assert (want["later"][0] - want["later"][1]).abs().max() > 1e-3  # the two CFG rows differ


def _one_process(checkpoint: Path, kwargs: dict, cfg_batch: bool) -> tuple[list, list]:
    """The reference run in this process, on one thread as each worker: a clip magnifies float32
    reduction-order differences (VAE, motion re-encoding); threads alone move the tiny random
    model's second clip by ~1e-2."""
    from model.pipeline import S2VPipeline

    pipe = S2VPipeline.from_checkpoint(checkpoint, device="cpu", cfg_batch=cfg_batch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _render(pipe, kwargs)
    finally:
        torch.set_num_threads(threads)


CLIPS = {"num_clips": 2, "infer_frames": INFER, "steps": 2, "seed": 5}  # the second clip has motion tokens


def test_clip_equals_one_process(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # the tiny checkpoint's 2 heads: 2 ranks, sequence parallel, CFG as a batch of 2
    want, want_v = _one_process(tiny_checkpoint, CLIPS, cfg_batch=True)
    _spawn(_clip_worker, 2, str(tiny_checkpoint), CLIPS, False, str(tmp_path))
    for rank in range(2):
        _, (got, got_v) = _load_rank(tmp_path / f"rank{rank}.pt")
        # every DiT output of both clips (the CFG batch of each step) within float32 rounding
        assert len(got_v) == len(want_v) == CLIPS["steps"] * CLIPS["num_clips"]
        for velocity, expected in zip(got_v, want_v, strict=True):
            _close(velocity, expected)
        _similar_clips(got, want)


def test_cfg_and_sequence_parallel_clip_equals_one_process(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # 4 ranks: ranks 0-1 the conditional branch, 2-3 the unconditional, each half sequence
    # parallel; against one process running the branches as two passes (cfg_batch=False)
    want, want_v = _one_process(tiny_checkpoint, CLIPS, cfg_batch=False)
    _spawn(_clip_worker, 4, str(tiny_checkpoint), CLIPS, True, str(tmp_path))
    for rank in range(4):
        branch, (got, got_v) = _load_rank(tmp_path / f"rank{rank}.pt")
        assert branch == rank // 2
        # this rank's branch of every step: the reference's passes alternate cond, uncond
        assert len(got_v) * 2 == len(want_v) == 2 * CLIPS["steps"] * CLIPS["num_clips"]
        for velocity, expected in zip(got_v, want_v[branch::2], strict=True):
            _close(velocity, expected)
        _similar_clips(got, want)


def test_shards_cover_the_sequence_in_order() -> None:
    assert shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert shard_bounds(8, 2) == [(0, 4), (4, 8)]
    assert shard_bounds(3, 3) == [(0, 1), (1, 2), (2, 3)]


def test_heads_must_divide_by_the_ranks() -> None:
    check_heads(40, 8)
    with pytest.raises(ValueError, match=r"40 attention heads must divide by the number of ranks.*\[1, 2, 4, 5, 8"):
        check_heads(40, 3)


def test_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        sequence_parallel(_model())
