"""Fixtures for the model/ tests: the tiny S2V transformer with random weights and its inputs.

(Shared file: add fixtures, do not change existing ones.)
"""

from __future__ import annotations

import pytest
import torch

from model.config import S2VConfig
from model.transformer import WanS2VTransformer, randomize_


@pytest.fixture(scope="session")
def tiny_config() -> S2VConfig:
    return S2VConfig.tiny()


@pytest.fixture(scope="session")
def tiny_dit(tiny_config: S2VConfig) -> WanS2VTransformer:
    """The tiny transformer in float32 with non-trivial random weights (do not modify it)."""
    torch.manual_seed(0)
    return randomize_(WanS2VTransformer(tiny_config), seed=0).float().eval().requires_grad_(False)


def make_dit_inputs(cfg: S2VConfig, batch: int = 1, frames: int = 2, hw: tuple[int, int] = (16, 16), seed: int = 0):
    """Inputs of one clip of `4 * frames` video frames: latents [B, 16, frames, *hw] and friends."""
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    return {
        "latents": torch.randn(batch, cfg.in_dim, frames, h, w, generator=gen),
        "timestep": torch.full((batch,), 700.0),
        "context": torch.randn(batch, 7, cfg.text_dim, generator=gen),
        "ref_latents": torch.randn(batch, cfg.in_dim, 1, h, w, generator=gen),
        "audio": torch.randn(batch, cfg.audio_num_layers, cfg.audio_dim, 4 * frames, generator=gen),
        "motion_latents": torch.randn(batch, cfg.in_dim, cfg.lat_motion_frames, h, w, generator=gen),
        "pose_latents": torch.randn(batch, cfg.cond_dim, frames, h, w, generator=gen),
    }


@pytest.fixture
def dit_inputs(tiny_config: S2VConfig) -> dict[str, torch.Tensor]:
    """Batch-1 inputs of a later clip (motion latents present) for `tiny_dit`."""
    return make_dit_inputs(tiny_config)


@pytest.fixture(scope="session")
def make_inputs():
    """The `make_dit_inputs(cfg, batch=1, frames=2, hw=(16, 16), seed=0)` factory."""
    return make_dit_inputs


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A complete tiny S2V checkpoint folder in the official layout (written once per session)."""
    from model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-s2v"), seed=0)
