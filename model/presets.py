"""The speed presets and their parts as plain settings, without torch (the planner reads them).

See model/speed.py for what each part does in the sampling loop and where it comes from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

CacheMethod = Literal["none", "easycache", "magcache"]
CACHE_METHODS: tuple[str, ...] = ("none", "easycache", "magcache")
PRESET_NAMES: tuple[str, ...] = ("exact", "balanced", "fast")

# Distilled mode (model/distilled.py, LiveAvatar): sampling fixed by its distillation, not a preset.
DISTILLED_STEPS = 4
"""Euler steps (LiveAvatar's --sample_steps 4)."""
DISTILLED_SHIFT = 3.0
"""Its FlowMatchEulerDiscreteScheduler(shift=3), whatever the resolution."""
DISTILLED_INFER_FRAMES = 48
"""Frames per clip: 12 latent frames, 4 blocks of 3, also its attention window (--infer_frames 48)."""


@dataclass(frozen=True)
class SpeedConfig:
    """How one clip is sampled, beyond the row's own steps and guidance. The default is exact."""

    steps: int | None = None
    """Denoising steps at most (None: the row's, 40 by default); a row asking for fewer keeps its own."""
    shift: float | None = None
    """Noise-schedule shift (None: the resolution's)."""
    cfg_steps: int | None = None
    """Guidance only on the first this many steps (None: on every step)."""
    cfg_every: int = 0
    """After those, guidance also on every this-many-th step (0: never)."""
    cache: CacheMethod = "none"
    cache_threshold: float = 0.05
    """EasyCache: accumulated predicted change; MagCache: accumulated magnitude error."""
    cache_warmup: float = 0.2
    """Share of the first steps that always run (EasyCache's ret_steps, MagCache's retention ratio)."""
    cache_max_skips: int = 3
    """Steps skipped in a row at most."""
    mag_ratios: tuple[float, ...] | None = None
    """MagCache's calibrated magnitude ratios (one per step of the calibrated run, first = 1)."""

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if self.cfg_steps is not None and self.cfg_steps < 0:
            raise ValueError(f"cfg_steps must be >= 0, got {self.cfg_steps}")
        if self.cfg_every < 0:
            raise ValueError(f"cfg_every must be >= 0, got {self.cfg_every}")
        if self.cache not in CACHE_METHODS:
            raise ValueError(f"cache {self.cache!r}: expected one of {', '.join(CACHE_METHODS)}")
        if not self.cache_threshold >= 0 or not 0 <= self.cache_warmup <= 1 or self.cache_max_skips < 0:
            raise ValueError("cache_threshold must be >= 0, cache_warmup in [0, 1], cache_max_skips >= 0")

    @property
    def exact(self) -> bool:
        """True when sampling is the reference's (steps and shift aside, which the caller sets)."""
        return self.cfg_steps is None and self.cache == "none"

    def guided(self, step: int) -> bool:
        """Whether step `step` (0-based) runs classifier-free guidance."""
        if self.cfg_steps is None or step < self.cfg_steps:
            return True
        return self.cfg_every > 0 and (step - self.cfg_steps + 1) % self.cfg_every == 0

    def nominal_forwards(self, steps: int, guidance: bool = True) -> int:
        """DiT passes (batch rows) per clip without caching: 2 per guided step, 1 otherwise."""
        if not guidance:
            return steps
        return sum(2 if self.guided(i) else 1 for i in range(steps))

    def sampling_steps(self, steps: int) -> int:
        """The steps a clip runs when its row asks for `steps`: a preset never adds steps."""
        return min(steps, self.steps) if self.steps else steps

    @classmethod
    def from_dict(cls, data: dict) -> SpeedConfig:
        """The inverse of `to_dict` (a JSON round trip turns the ratios into a list)."""
        ratios = data.get("mag_ratios")
        return cls(**{**data, "mag_ratios": tuple(ratios) if ratios is not None else None})

    def to_dict(self) -> dict:
        out = asdict(self)
        out["mag_ratios"] = list(self.mag_ratios) if self.mag_ratios is not None else None
        return out


# The presets. Targets (issue #18, one H100, 480p 80-frame clip): exact <= 220 s, balanced
# <= 110 s, fast <= 60 s. A DiT pass costs ~2.68 s there (FA4, compiled) and the rest of a clip
# ~9 s (VAE decode and the carry's encode). Without any skipped step balanced runs 36 passes (6
# guided steps of 2, 24 of 1; ~106 s) against exact's 80, and fast 17 (3 x 2 + 11; ~55 s): the
# deterministic parts alone reach the targets on random weights, where no step cache can be
# relied on; on real weights the cache takes more off where the output changes slowly. UniPC
# (order 2, as the reference) is built for few steps; 30 and 14 are within its usual range.
PRESETS: dict[str, SpeedConfig] = {
    "exact": SpeedConfig(),
    "balanced": SpeedConfig(steps=30, cfg_steps=6, cache="easycache", cache_threshold=0.05, cache_max_skips=2),
    "fast": SpeedConfig(steps=14, cfg_steps=3, cache="easycache", cache_threshold=0.1, cache_max_skips=2),
}


def preset(name: str, calibration: dict | None = None, **overrides) -> SpeedConfig:
    """The preset `name` with `overrides` (None values ignored); MagCache takes its ratios from a
    calibration document (tasks/calibrate.py) when the preset or an override asks for it."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: expected one of {', '.join(PRESET_NAMES)}")
    config = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    if config.cache == "magcache" and config.mag_ratios is None:
        ratios = (calibration or {}).get("magcache", {}).get("ratios")
        if not ratios:
            raise ValueError(
                "cache 'magcache' needs magnitude ratios calibrated on the model: run `s2v-batch calibrate "
                "--checkpoint ...` and point the calibration setting at its JSON, or use cache 'easycache'"
            )
        config = replace(config, mag_ratios=tuple(float(r) for r in ratios))
    return config
