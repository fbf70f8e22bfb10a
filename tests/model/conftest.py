"""Fixtures for the model/ tests: the tiny S2V transformer with random weights and its inputs.

(Shared file: add fixtures, do not change existing ones.)
"""

from __future__ import annotations

from pathlib import Path

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


@pytest.fixture(scope="session")
def tiny_comfyui(tmp_path_factory: pytest.TempPathFactory):
    """`tiny_checkpoint`'s weights as ComfyUI's bf16 single files, in a ComfyUI models/ tree
    (returns the models/ folder; its parent stands for the ComfyUI install)."""
    from model.tiny import write_tiny_comfyui

    return write_tiny_comfyui(tmp_path_factory.mktemp("tiny-comfy") / "models", seed=0)


@pytest.fixture(scope="session")
def tiny_comfyui_fp8(tmp_path_factory: pytest.TempPathFactory):
    """`tiny_checkpoint`'s weights as ComfyUI's scaled-fp8 files, all in one flat folder."""
    from model.tiny import write_tiny_comfyui

    return write_tiny_comfyui(tmp_path_factory.mktemp("tiny-comfy-fp8"), seed=0, fp8_scaled=True, flat=True)


def mirror_folder(src: Path, dst: Path, skip: set[str] = frozenset()) -> Path:
    """A copy of the folder `src` made of symlinks, without the files (relative paths) in `skip`."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_file() and str(rel) not in skip:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).symlink_to(path)
    return dst


@pytest.fixture(scope="session")
def make_mirror():
    """The `mirror_folder(src, dst, skip=())` factory."""
    return mirror_folder
