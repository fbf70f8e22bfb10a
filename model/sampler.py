"""Flow-matching UniPC sampling with classifier-free guidance, on diffusers' UniPC scheduler.

The reference uses its own copy of UniPC for flow matching (`wan/utils/fm_solvers_unipc.py`);
diffusers' `UniPCMultistepScheduler` with `use_flow_sigmas=True, prediction_type="flow_prediction"`
runs the same bh2 predictor-corrector of order 2 (x0 = x - sigma * v). The only difference is the
sigma grid: the reference spaces `steps` sigmas from 0.999 (its training schedule's sigma_max)
down to 0 (exclusive), then shifts them; diffusers' default starts at 1.0. We pass the reference's
unshifted grid as `sigmas`, and diffusers applies the same shift s * x / (1 + (s - 1) * x) and the
same final sigma 0. Timesteps handed to the model are int64 sigma * 1000, as in the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

NUM_TRAIN_TIMESTEPS = 1000
SHIFT = {"480p": 3.0, "720p": 5.0}
STEPS = 40
GUIDANCE = 4.5
# The reference's training schedule: sigmas 1 - linspace(1, 1/1000, 1000) reversed, in float32.
_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


def shift_for(resolution: str) -> float:
    """Noise-schedule shift for a resolution bucket ('480p' -> 3, '720p' -> 5)."""
    try:
        return SHIFT[resolution]
    except KeyError:
        raise ValueError(f"no shift known for resolution {resolution!r}; expected one of {sorted(SHIFT)}") from None


def make_scheduler(steps: int = STEPS, shift: float = SHIFT["480p"]) -> UniPCMultistepScheduler:
    """A fresh flow-matching UniPC scheduler with its timesteps set (one per clip: it is stateful)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    sigmas = np.linspace(_SIGMA_MAX, 0.0, steps + 1)[:-1]
    scheduler.set_timesteps(sigmas=sigmas)  # type: ignore[arg-type]
    return scheduler


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as the reference writes it: u + s * (c - u)."""
    return uncond + scale * (cond - uncond)


def sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    steps: int = STEPS,
    shift: float = SHIFT["480p"],
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Integrate from `noise` to a clean latent.

    `velocity(latents, t)` returns the (already guided) flow prediction for latents of the same
    shape; `t` is a 1-element int64 tensor on the latents' device. The scheduler keeps its own
    history, so each call builds a fresh one and nothing leaks between clips.
    """
    scheduler = make_scheduler(steps, shift)
    latents = noise
    timesteps = scheduler.timesteps.to(noise.device)
    for i in range(len(timesteps)):
        t = timesteps[i : i + 1]
        v = velocity(latents, t)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents
