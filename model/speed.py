"""Speed options for the sampling loop: step caching, CFG truncation, fewer steps; and the presets.

Everything here wraps the velocity function the sampler calls once per denoising step (the
pipeline's guided DiT call); the transformer's forward is never changed. Per clip a fresh
`ClipVelocity` is built, so no state crosses clips: a segment resumed at clip r from its stored
state renders exactly what the uninterrupted run rendered, in every preset.

The parts, each its own setting (`SpeedConfig`):

- **steps / shift**: fewer denoising steps. The shift stays the resolution's (3 at 480p, 5 at 720p,
  the official configuration's values; no source gives S2V other values for fewer steps) unless
  set: `shift` is its own setting so `calibrate` can compare.
- **CFG truncation** (`cfg_steps`, `cfg_every`): classifier-free guidance (two DiT passes: prompt
  and audio, negative prompt and zeroed audio) only on the first `cfg_steps` steps, and after them
  on every `cfg_every`-th step (0: never); the other steps run the conditional pass alone. Guidance
  matters most while the coarse layout forms, at high noise (Kynkäänniemi et al. 2024, "Applying
  guidance in a limited interval"); ComfyUI's Wan wrappers expose the same as a CFG schedule.
- **step caching** (`cache`): skip the DiT on steps where its output is predicted to change little
  and reuse what it gave before:
  * `easycache` (EasyCache, Zhou et al. 2025, H-EmbodVis/EasyCache): no calibration. After each
    computed step it measures the transformation rate k = |v_t - v_s| / |x_t - x_s| (output change
    over input change since the last computed step s); on a later step it predicts the relative
    output change k * |x_t - x_{t-1}| / |v_s|, accumulates it, and reuses the cached transformation
    (v_s - x_s, added to the current input) while the sum stays under `cache_threshold`. The
    first `cache_warmup` of the steps and the last step always run.
  * `magcache` (MagCache, Ma et al. 2025, Zehong-Ma/MagCache): magnitude ratios calibrated per
    model (`s2v-batch calibrate`): r_t = mean over tokens of |v_t| / |v_{t-1}| along an exact run.
    After the warm-up it multiplies the ratios since the last computed step and accumulates the
    error |1 - product|; while that stays under `cache_threshold` (and at most `cache_max_skips`
    steps in a row) the last output is reused. The decisions depend only on the calibrated ratios,
    so MagCache never waits for the GPU; EasyCache reads one number per step back from it.
  Both reference implementations cut inside the forward (the residual of the blocks, the head
  recomputed); ours sit outside it, on the DiT's guided output, which is what keeps the transformer
  untouched. The same `cache_max_skips` bounds both.

Presets (`PRESETS`, in model/presets.py, which the planner reads without torch): `exact` is
today's output bit for bit (no wrapper at all); `balanced` and `fast` are built from the parts
above. Their speed is measured (bench/presets_speed.py, random weights); their quality can only
be judged on real weights, with `s2v-batch calibrate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from model.presets import CACHE_METHODS, PRESET_NAMES, PRESETS, SpeedConfig, preset

__all__ = [
    "CACHE_METHODS",
    "PRESETS",
    "PRESET_NAMES",
    "ClipVelocity",
    "EasyCache",
    "ForwardCounter",
    "MagCache",
    "SpeedConfig",
    "StepLog",
    "clip_velocity",
    "magnitude_ratio",
    "preset",
    "resample_ratios",
]

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# step caches


def _mean_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs().mean()


class EasyCache:
    """EasyCache's runtime transformation-rate test (see the module docstring). The rate stays on
    the device; each decision reads one number back (`compute`), nothing else waits for the GPU."""

    def __init__(self, steps: int, threshold: float, warmup: float, max_skips: int) -> None:
        self.steps = steps
        self.threshold = threshold
        self.warmup = math.ceil(warmup * steps)
        self.max_skips = max_skips
        self.prev_in: torch.Tensor | None = None  # input of the step before (computed or not)
        self.restart()

    def restart(self) -> None:
        """Forget the cached output and its rate (after a switch between guided and conditional)."""
        self.last_in: torch.Tensor | None = None  # input of the last computed step
        self.last_out: torch.Tensor | None = None
        self.rate: torch.Tensor | None = None
        self.accumulated: torch.Tensor | float = 0.0
        self.skipped = 0

    def compute(self, step: int, latents: torch.Tensor) -> bool:
        prev, self.prev_in = self.prev_in, latents
        if step < self.warmup or step >= self.steps - 1 or self.rate is None or prev is None:
            return True
        if self.skipped >= self.max_skips:
            return True
        change = self.rate * _mean_abs(latents - prev) / _mean_abs(self.last_out).clamp_min(1e-12)
        self.accumulated = self.accumulated + change
        return bool(self.accumulated >= self.threshold)  # the one read-back per step

    def computed(self, step: int, latents: torch.Tensor, out: torch.Tensor) -> None:
        if self.last_out is not None and self.last_in is not None:
            moved = _mean_abs(latents - self.last_in).clamp_min(1e-12)
            self.rate = _mean_abs(out - self.last_out) / moved
        self.last_in, self.last_out = latents, out
        self.accumulated = 0.0
        self.skipped = 0

    def reuse(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        self.skipped += 1
        return latents + (self.last_out - self.last_in)


def resample_ratios(ratios: Sequence[float], steps: int) -> np.ndarray:
    """Calibrated ratios mapped to another number of steps by nearest index (MagCache's own way)."""
    src = np.asarray(ratios, dtype=np.float64)
    if steps == len(src):
        return src
    if steps == 1:
        return src[-1:]
    return src[np.round(np.arange(steps) * (len(src) - 1) / (steps - 1)).astype(int)]


class MagCache:
    """MagCache's calibrated magnitude-ratio test (see the module docstring)."""

    def __init__(self, steps: int, ratios: Sequence[float], threshold: float, warmup: float, max_skips: int) -> None:
        self.steps = steps
        self.ratios = resample_ratios(ratios, steps)
        self.threshold = threshold
        self.warmup = math.ceil(warmup * steps)
        self.max_skips = max_skips
        self.ratio = 1.0
        self.error = 0.0
        self.skipped = 0
        self.last_out: torch.Tensor | None = None

    def compute(self, step: int, latents: torch.Tensor) -> bool:
        if step < self.warmup or step >= self.steps - 1 or self.last_out is None:
            return True
        self.ratio *= float(self.ratios[step])
        self.error += abs(1.0 - self.ratio)
        return not (self.error < self.threshold and self.skipped < self.max_skips)

    def restart(self) -> None:
        self.last_out = None
        self.ratio, self.error, self.skipped = 1.0, 0.0, 0

    def computed(self, step: int, latents: torch.Tensor, out: torch.Tensor) -> None:
        self.last_out = out
        self.ratio, self.error, self.skipped = 1.0, 0.0, 0

    def reuse(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        self.skipped += 1
        return self.last_out


def magnitude_ratio(out: torch.Tensor, previous: torch.Tensor) -> float:
    """Mean over tokens (positions) of |out| / |previous|, the norm over channels: MagCache's ratio."""
    num = out.float().norm(dim=1)
    den = previous.float().norm(dim=1).clamp_min(1e-12)
    return float((num / den).mean())


# ---------------------------------------------------------------------------------------------
# the per-clip velocity


@dataclass
class StepLog:
    """What happened on each step of a clip: guided or not, computed or reused, and the output norms
    of an exact run (for MagCache's calibration)."""

    guided: list[bool] = field(default_factory=list)
    computed: list[bool] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


class ClipVelocity:
    """velocity(latents, t) for one clip's steps, in order: picks the guided or conditional pass for
    the step and asks the step cache whether to run it. `record_ratios` logs MagCache's ratios."""

    def __init__(
        self,
        guided: Velocity | None,
        cond_only: Velocity,
        config: SpeedConfig,
        steps: int,
        record_ratios: bool = False,
    ) -> None:
        self.guided_fn = guided
        self.cond_fn = cond_only
        self.config = config
        self.steps = steps
        self.step = 0
        self.log = StepLog()
        self.record = record_ratios
        self._previous: torch.Tensor | None = None
        self.cache: EasyCache | MagCache | None = None
        if config.cache == "easycache":
            self.cache = EasyCache(steps, config.cache_threshold, config.cache_warmup, config.cache_max_skips)
        elif config.cache == "magcache":
            if not config.mag_ratios:
                raise ValueError("cache 'magcache' needs calibrated magnitude ratios (SpeedConfig.mag_ratios)")
            self.cache = MagCache(
                steps, config.mag_ratios, config.cache_threshold, config.cache_warmup, config.cache_max_skips
            )

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = self.step
        self.step += 1
        guided = self.guided_fn is not None and self.config.guided(step)
        fn = self.guided_fn if guided else self.cond_fn
        self.log.guided.append(guided)
        # a switch between guided and conditional outputs is not a small change: always compute
        switched = step > 0 and self.log.guided[-2] != guided
        if self.cache is not None and switched:
            self.cache.restart()
        if self.cache is not None and not self.cache.compute(step, latents):
            self.log.computed.append(False)
            return self.cache.reuse(step, latents)
        out = fn(latents, t)
        if self.cache is not None:
            self.cache.computed(step, latents, out)
        self.log.computed.append(True)
        if self.record:
            self.log.ratios.append(1.0 if self._previous is None else magnitude_ratio(out, self._previous))
            self._previous = out
        return out


def clip_velocity(
    guided: Velocity | None, cond_only: Velocity, config: SpeedConfig | None, steps: int, record_ratios: bool = False
) -> Velocity:
    """The velocity function for one clip: the plain guided (or, without guidance, conditional)
    call when `config` is exact and nothing is recorded, so exact sampling runs today's code."""
    if (config is None or config.exact) and not record_ratios:
        return guided if guided is not None else cond_only
    return ClipVelocity(guided, cond_only, config or SpeedConfig(), steps, record_ratios)


class ForwardCounter:
    """Counts the DiT's forward passes as batch rows (a CFG batch of 2 counts 2), with a forward
    pre-hook (outside the forward, no host synchronisation: the batch size is known on the host)."""

    def __init__(self, module: nn.Module) -> None:
        self.count = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.count += int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) else 1

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> ForwardCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
