"""Speed options around the sampling loop: exact stays today's output, the presets run fewer DiT
passes and resume losslessly, and the step caches decide as their papers describe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from media import gradient_image, voiced_tone

from model.pipeline import S2VPipeline
from model.speed import (
    PRESETS,
    ClipVelocity,
    EasyCache,
    MagCache,
    SpeedConfig,
    clip_velocity,
    preset,
    resample_ratios,
)

INFER = 8


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint: Path) -> S2VPipeline:
    return S2VPipeline.from_checkpoint(tiny_checkpoint, device="cpu")


def _clips(pipeline: S2VPipeline, **kwargs):
    args = {"num_clips": 2, "infer_frames": INFER, "steps": 6, "seed": 3} | kwargs
    return list(pipeline.generate_clips(gradient_image(), voiced_tone(1.0), "a person talks", **args))


def test_exact_is_the_plain_call_and_todays_output(pipeline):
    def guided(x, t):
        return x

    def cond(x, t):
        return -x

    # no wrapper at all: the sampler calls the same function as before this option existed
    assert clip_velocity(guided, cond, PRESETS["exact"], 40) is guided
    assert clip_velocity(guided, cond, None, 40) is guided
    assert clip_velocity(None, cond, SpeedConfig(steps=10), 10) is cond
    assert SpeedConfig(steps=10).sampling_steps(40) == 10 and SpeedConfig(steps=10).sampling_steps(6) == 6
    plain, exact = _clips(pipeline), _clips(pipeline, speed=preset("exact"))
    for a, b in zip(plain, exact, strict=True):
        assert np.array_equal(a.frames, b.frames)
        assert all(np.array_equal(a.state[k], b.state[k]) for k in a.state)
        assert a.forwards == b.forwards == 2 * 6  # CFG as a batch of 2: two passes per step
        assert a.steps is None


def test_presets_run_fewer_passes_and_resume_losslessly(pipeline):
    for name in ("balanced", "fast"):
        config = preset(name)
        whole = _clips(pipeline, speed=config, steps=40)  # the preset caps the row's 40 steps
        assert all(c.forwards <= config.nominal_forwards(config.steps) < 2 * config.steps for c in whole)
        assert all(len(c.steps.computed) == config.steps for c in whole)
        for c in whole:
            runs = zip(c.steps.guided, c.steps.computed, strict=True)
            assert c.forwards == sum(2 if guided else 1 for guided, run in runs if run)
        # clip 1 rendered from clip 0's stored state equals the uninterrupted clip 1
        resumed = _clips(pipeline, speed=config, steps=40, start_clip=1, state=whole[0].state)
        assert np.array_equal(resumed[0].frames, whole[1].frames)
        assert all(np.array_equal(resumed[0].state[k], whole[1].state[k]) for k in whole[1].state)


def test_cfg_truncation_schedule():
    config = SpeedConfig(cfg_steps=3, cfg_every=4)
    assert [config.guided(i) for i in range(12)] == [True] * 3 + [False, False, False, True] * 2 + [False]
    assert SpeedConfig(cfg_steps=2).nominal_forwards(5) == 2 * 2 + 3
    assert SpeedConfig().nominal_forwards(40) == 80 and SpeedConfig().nominal_forwards(40, guidance=False) == 40
    assert PRESETS["balanced"].nominal_forwards(30) == 36 and PRESETS["fast"].nominal_forwards(14) == 17


def test_cfg_truncation_calls_the_conditional_pass():
    calls = []

    def guided(x, t):
        calls.append("g")
        return x * 2

    def cond(x, t):
        calls.append("c")
        return x * 3

    velocity = clip_velocity(guided, cond, SpeedConfig(cfg_steps=2, cfg_every=2), 6)
    x = torch.ones(1, 2)
    outs = [float(velocity(x, torch.tensor([t]))[0, 0]) for t in range(6)]
    assert calls == ["g", "g", "c", "g", "c", "g"] and outs == [2, 2, 3, 2, 3, 2]


def _run(velocity: ClipVelocity, steps: int, drift: float = 0.01) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Drive a velocity like a sampler would (latents move a little each step): [(input, output)]."""
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 64)
    seen = []
    for i in range(steps):
        v = velocity(x, torch.tensor([i]))
        seen.append((x, v))
        x = x - drift * v
    return seen


def test_easycache_reuses_the_transformation_while_the_predicted_change_is_small():
    def slow(x, t):  # output changes exactly as fast as the input: k = 1
        return x + 1.0

    steps = 20
    config = SpeedConfig(cache="easycache", cache_threshold=0.05, cache_warmup=0.2, cache_max_skips=3)
    velocity = clip_velocity(slow, slow, config, steps)
    seen = _run(velocity, steps)
    computed = velocity.log.computed
    assert computed[:4] == [True] * 4 and computed[-1]  # warm-up (20 % of 20) and the last step run
    assert not all(computed) and "False, False, False, False" not in str(computed)  # skips, at most 3 in a row
    # a reused step returns the current input plus the cached transformation v - x (here exactly 1)
    for (x, out), run in zip(seen, computed, strict=True):
        if not run:
            assert torch.allclose(out, x + 1.0)
    never = clip_velocity(slow, slow, SpeedConfig(cache="easycache", cache_threshold=0.0), steps)
    _run(never, steps)
    assert all(never.log.computed)


def test_magcache_skips_on_calibrated_ratios():
    def v(x, t):
        return x.clone()

    steps = 10
    flat = SpeedConfig(cache="magcache", mag_ratios=(1.0,) * steps, cache_warmup=0.2, cache_max_skips=2)
    velocity = clip_velocity(v, v, flat, steps)
    _run(velocity, steps)
    assert velocity.log.computed == [True, True, False, False, True, False, False, True, False, True]
    steep = SpeedConfig(cache="magcache", mag_ratios=(1.0,) + (1.5,) * (steps - 1), cache_threshold=0.1)
    velocity = clip_velocity(v, v, steep, steps)
    _run(velocity, steps)
    assert all(velocity.log.computed)
    assert list(resample_ratios([1.0, 0.9, 0.8, 0.7, 0.6], 3)) == [1.0, 0.8, 0.6]


def test_magcache_needs_a_calibration():
    with pytest.raises(ValueError, match="s2v-batch calibrate"):
        preset("balanced", cache="magcache")
    config = preset("balanced", {"magcache": {"steps": 4, "ratios": [1.0, 0.99, 0.98, 0.97]}}, cache="magcache")
    assert config.mag_ratios == (1.0, 0.99, 0.98, 0.97) and config.steps == 30
    with pytest.raises(ValueError, match="preset 'quick'"):
        preset("quick")
    with pytest.raises(ValueError, match="cache 'teacache'"):
        SpeedConfig(cache="teacache")


def test_recorded_magnitude_ratios(pipeline):
    clips = _clips(pipeline, num_clips=1, record_steps=True)
    ratios = clips[0].steps.ratios
    assert len(ratios) == 6 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    assert all(clips[0].steps.computed) and clips[0].forwards == 12


def test_cache_classes_reset_between_clips():
    # a fresh cache per clip: nothing of one clip's history reaches the next
    a = EasyCache(10, 0.05, 0.2, 2)
    assert a.last_out is None and a.rate is None
    m = MagCache(10, [1.0] * 10, 0.1, 0.2, 2)
    assert m.last_out is None and m.error == 0.0
