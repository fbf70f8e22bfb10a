"""Parity of our S2V transformer with DiffSynth-Studio's `WanS2VModel` (issue 4, item 5).

Same random weights (our state_dict loaded into DiffSynth's model with strict=True, which also
checks that the parameter names and shapes agree), same inputs, float32 on CPU, tiny config:
a first clip (no motion tokens) and a later clip (FramePack motion tokens), both with audio
injection, AdaIN, the pose condition and the zero timestep for reference/motion tokens.

    pip install --no-deps diffsynth==2.1.12 einops
    python bench/parity_diffsynth.py [--config tiny|wan14b-narrow] [--seed 0]

DiffSynth's package __init__ imports its training and data stack (torchvision, modelscope,
...), which does not install next to a CPU-only torch; its DiT modules need only torch, einops and
numpy. So this script registers the `diffsynth` and `diffsynth.core` packages without running their
__init__ and imports the real `diffsynth/models/wan_video_dit_s2v.py` from the installed wheel.
DiffSynth's forward for S2V lives in its pipeline (`model_fn_wans2v`, whose module imports the
whole stack); `diffsynth_forward` below makes the same calls on the DiffSynth modules in the same
order, without logic of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.machinery
import importlib.util
import sys
import types

import torch

from model.config import S2VConfig
from model.transformer import WanS2VTransformer, randomize_


def import_diffsynth_s2v() -> types.ModuleType:
    """Import diffsynth.models.wan_video_dit_s2v without executing the package __init__ files."""
    if "diffsynth" not in sys.modules:
        spec = importlib.util.find_spec("diffsynth")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("diffsynth is not installed: pip install --no-deps diffsynth==2.1.12 einops")
        root = list(spec.submodule_search_locations)[0]
        for name, path in (("diffsynth", root), ("diffsynth.core", f"{root}/core")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            pkg.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            pkg.__spec__.submodule_search_locations = [path]
            sys.modules[name] = pkg
    return importlib.import_module("diffsynth.models.wan_video_dit_s2v")


def build_diffsynth(ds: types.ModuleType, cfg: S2VConfig) -> torch.nn.Module:
    return ds.WanS2VModel(
        dim=cfg.dim,
        in_dim=cfg.in_dim,
        ffn_dim=cfg.ffn_dim,
        out_dim=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        eps=cfg.eps,
        patch_size=cfg.patch_size,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        cond_dim=cfg.cond_dim,
        audio_dim=cfg.audio_dim,
        num_audio_token=cfg.num_audio_token,
        enable_adain=cfg.enable_adain,
        audio_inject_layers=list(cfg.audio_inject_layers),
        zero_timestep=cfg.zero_timestep,
        add_last_motion=cfg.add_last_motion,
        framepack_drop_mode=cfg.framepack_drop_mode,
    )


@torch.no_grad()
def diffsynth_forward(ds, dit, latents, timestep, context, ref_latents, audio, motion_latents, pose, drop_motion):
    """The calls of DiffSynth's `model_fn_wans2v` (pipelines/wan_video.py), batch 1."""
    x = latents
    context = dit.text_embedding(context)
    audio_emb_global, merged_audio_emb = dit.cal_audio_emb(audio)
    x, (f, h, w) = dit.patchify(dit.patch_embedding(x) + dit.cond_encoder(pose))
    seq_len_x = x.shape[1]
    ref, (rf, rh, rw) = dit.patchify(dit.patch_embedding(ref_latents))
    grid_sizes = dit.get_grid_sizes((f, h, w), (rf, rh, rw))
    x = torch.cat([x, ref], dim=1)
    mask = torch.cat([torch.zeros([1, seq_len_x]), torch.ones([1, ref.shape[1]])], dim=1).to(torch.long).to(x.device)
    freqs = ds.rope_precompute(
        x.detach().view(1, x.size(1), dit.num_heads, dit.dim // dit.num_heads), grid_sizes, dit.freqs
    )
    x, freqs, mask = dit.inject_motion(
        x, freqs, mask, motion_latents, drop_motion_frames=drop_motion, add_last_motion=2
    )
    x = x + dit.trainable_cond_mask(mask).to(x.dtype)
    timestep = torch.cat([timestep, torch.zeros([1], dtype=timestep.dtype, device=timestep.device)])
    t = dit.time_embedding(ds.sinusoidal_embedding_1d(dit.freq_dim, timestep))
    t_mod = dit.time_projection(t).unflatten(1, (6, dit.dim)).unsqueeze(2).transpose(0, 2)
    for block_id, block in enumerate(dit.blocks):
        x = block(x, context, t_mod, seq_len_x, freqs[0])
        x = dit.after_transformer_block(block_id, x, audio_emb_global, merged_audio_emb, seq_len_x)
    x = x[:, :seq_len_x]
    x = dit.head(x, t[:-1])
    return dit.unpatchify(x, (f, h, w))


def make_inputs(cfg: S2VConfig, seed: int, lat_hw: tuple[int, int] = (16, 16), frames: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    h, w = lat_hw
    audio_frames = 4 * frames  # the clip's video frames; the encoder gives `frames` latent frames
    return {
        "latents": torch.randn(1, cfg.in_dim, frames, h, w, generator=gen),
        "timestep": torch.tensor([637.0]),
        "context": torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen),
        "ref_latents": torch.randn(1, cfg.in_dim, 1, h, w, generator=gen),
        "audio": torch.randn(1, cfg.audio_num_layers, cfg.audio_dim, audio_frames, generator=gen),
        "motion_latents": torch.randn(1, cfg.in_dim, cfg.lat_motion_frames, h, w, generator=gen),
        "pose_latents": torch.randn(1, cfg.cond_dim, frames, h, w, generator=gen),
    }


def compare(cfg: S2VConfig, seed: int = 0) -> dict[str, dict[str, float]]:
    """Relative L2 error and max abs difference, ours vs DiffSynth, first and later clip."""
    torch.manual_seed(seed)
    ours = randomize_(WanS2VTransformer(cfg), seed=seed).float().eval()
    ds = import_diffsynth_s2v()
    theirs = build_diffsynth(ds, cfg).float().eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    inputs = make_inputs(cfg, seed)
    results = {}
    for label, drop in (("first clip (no motion tokens)", True), ("later clip (motion tokens)", False)):
        with torch.no_grad():
            a = ours(**inputs, drop_motion_frames=drop)
        b = diffsynth_forward(
            ds,
            theirs,
            inputs["latents"],
            inputs["timestep"],
            inputs["context"],
            inputs["ref_latents"],
            inputs["audio"],
            inputs["motion_latents"],
            inputs["pose_latents"],
            drop,
        )
        rel = ((a - b).norm() / b.norm()).item()
        results[label] = {"rel_l2": rel, "max_abs": (a - b).abs().max().item(), "ref_norm": b.norm().item()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=["tiny", "wide"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = S2VConfig.tiny()
    if args.config == "wide":  # 14B head size (128) and more heads/layers, still CPU-sized
        cfg = dataclasses.replace(cfg, dim=512, ffn_dim=1024, num_heads=4, num_layers=6, audio_inject_layers=(0, 4, 5))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report(compare(cfg, args.seed), prefix=f"{args.config:5s} ")


def report(results: dict[str, dict[str, float]], prefix: str = "", tolerance: float = 1e-5) -> None:
    """Print each comparison's relative L2 error and max abs difference, then the verdict; exit 1
    when the worst relative error exceeds `tolerance`."""
    worst = 0.0
    for label, r in results.items():
        worst = max(worst, r["rel_l2"])
        print(f"{prefix}{label:32s} rel L2 {r['rel_l2']:.2e}  max abs {r['max_abs']:.2e}")
    print(f"worst relative error {worst:.2e} ({'PASS' if worst <= tolerance else 'FAIL'} at {tolerance:g})")
    if worst > tolerance:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
