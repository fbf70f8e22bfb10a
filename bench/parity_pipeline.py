"""Parity beyond the DiT (issue 4, item 5): the VAE, the sampler, and one full tiny clip.

Float32 on CPU, identical random weights, three comparisons against reference implementations:

(a) VAE: our `WanVAE` (diffusers' AutoencoderKLWan with keys converted from Wan's layout) against
    DiffSynth-Studio's `VideoVAE_` (`diffsynth/models/wan_video_vae.py`, the Wan2.1 VAE code with
    Wan's own key names) loaded strictly with the same weights in Wan's layout: encode of a
    random 1 + 4k frame video, decode of random latents, and decode of the encoded latents.
    Latent normalisation as DiffSynth's `WanVideoVAE` applies it (mean, 1 / std; clamp on decode).
(b) Sampler: our `model.sampler.sample` (diffusers' UniPCMultistepScheduler on the reference's
    sigma grid) against the official `FlowUniPCMultistepScheduler` (`wan/utils/fm_solvers_unipc.py`
    of Wan2.2; DiffSynth has no UniPC), driven by the same velocity function (our tiny DiT with
    fixed conditioning and CFG 4.5) for one clip of 40 steps at shift 3, as `wan/speech2video.py`
    builds and steps it. Compared: the timesteps given to the model and the final latent.
(c) One full clip loop: `S2VPipeline.generate_clips` on the tiny checkpoint (2 clips: a first clip,
    then a clip conditioned on motion latents) against the same sequence replayed on the reference
    modules: DiffSynth's DiT (forward calls as in bench/parity_diffsynth.py), DiffSynth's VAE, the
    official UniPC scheduler, and the clip bookkeeping of `wan/speech2video.py` (seed + clip noise,
    first clip decoded after the reference latent minus 3 frames, later clips decoded after the
    motion latents, the last 73 frames carried and re-encoded). Text and audio conditioning come
    from our encoders (transformers' umT5 / wav2vec2) and are shared, so (c) checks DiT + VAE +
    sampler + clip loop together. Compared: the float frames in [-1, 1] of each clip.

The official scheduler is loaded from a Wan2.2 checkout (a file path, or a git directory read with
`git show`); no reference code lives in this repository.

    .venv/bin/pip install --no-deps diffsynth==2.1.12 einops
    git clone https://github.com/Wan-Video/Wan2.2 /tmp/Wan2.2
    .venv/bin/python bench/parity_pipeline.py --wan /tmp/Wan2.2/wan/utils/fm_solvers_unipc.py
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from model.config import S2VConfig
from model.pipeline import FIRST_CLIP_DROP, S2VPipeline
from model.sampler import guide, sample
from model.tiny import _randomize, write_tiny_checkpoint
from model.transformer import WanS2VTransformer, randomize_
from model.vae import LATENT_MEAN, LATENT_STD, WanVAE, diffusers_to_wan_vae

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity_diffsynth import build_diffsynth, diffsynth_forward, import_diffsynth_s2v  # noqa: E402

UNIPC_PATH = "wan/utils/fm_solvers_unipc.py"


def rel(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Relative L2 error of `a` against the reference `b`, and the max abs difference."""
    a, b = a.double(), b.double()
    return {
        "rel_l2": ((a - b).norm() / b.norm()).item(),
        "max_abs": (a - b).abs().max().item(),
        "ref_rms": b.pow(2).mean().sqrt().item(),
    }


def load_wan_unipc(source: str) -> types.ModuleType:
    """The official fm_solvers_unipc module, from a file or from a Wan2.2 git directory."""
    path = Path(source)
    if path.is_dir() and (path / UNIPC_PATH).is_file():  # a checkout with a work tree
        path = path / UNIPC_PATH
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        text = subprocess.run(
            ["git", "-C", str(path), "show", f"HEAD:{UNIPC_PATH}"], capture_output=True, text=True, check=True
        ).stdout
    module = types.ModuleType("wan_fm_solvers_unipc")
    exec(compile(text, f"{source}:{UNIPC_PATH}", "exec"), module.__dict__)  # noqa: S102 (the reference, run as is)
    return module


def reference_scheduler(unipc: types.ModuleType, steps: int, shift: float):
    """Built and set as `wan/speech2video.py` does for sample_solver='unipc'."""
    scheduler = unipc.FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    scheduler.set_timesteps(steps, device="cpu", shift=shift)
    return scheduler


def reference_sample(unipc, velocity, noise: torch.Tensor, steps: int, shift: float) -> tuple[torch.Tensor, list]:
    """The reference's step loop (latents stepped one sample at a time, timestep stacked to [1])."""
    scheduler = reference_scheduler(unipc, steps, shift)
    latents = noise.clone()
    seen = []
    for t in scheduler.timesteps:
        timestep = torch.stack([t])
        seen.append(int(timestep))
        latents = scheduler.step(velocity(latents, timestep), t, latents, return_dict=False)[0]
    return latents, seen


# ---------------------------------------------------------------------------------------------
# (a) VAE


def vae_parity(seed: int, base_dim: int, frames: int, size: int) -> dict[str, dict[str, float]]:
    ds = import_diffsynth_vae()
    gen = torch.Generator().manual_seed(seed)
    config = {"base_dim": base_dim, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2}
    torch.manual_seed(seed)
    model = AutoencoderKLWan(**config)
    _randomize(model, gen)  # zero-initialised tensors get values, so every path counts
    ours = WanVAE(model)
    theirs = ds.VideoVAE_(dim=base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2).eval()
    theirs.load_state_dict(diffusers_to_wan_vae(model.state_dict(), 2), strict=True)
    scale = [torch.tensor(LATENT_MEAN), 1.0 / torch.tensor(LATENT_STD)]

    video = torch.rand(1, 3, frames, size, size, generator=gen) * 2 - 1
    z = torch.randn(1, 16, 1 + (frames - 1) // 4, size // 8, size // 8, generator=gen)
    with torch.no_grad():
        enc_ours, enc_ref = ours.encode(video), theirs.encode(video, scale)
        dec_ours, dec_ref = ours.decode(z), theirs.decode(z, scale).clamp_(-1, 1)
        rt_ours, rt_ref = ours.decode(enc_ours), theirs.decode(enc_ref, scale).clamp_(-1, 1)
    return {
        f"encode {frames}x{size}x{size}": rel(enc_ours, enc_ref),
        f"decode {tuple(z.shape[2:])} latents": rel(dec_ours, dec_ref),
        "decode(encode(video))": rel(rt_ours, rt_ref),
    }


def import_diffsynth_vae() -> types.ModuleType:
    import_diffsynth_s2v()  # registers the diffsynth packages without their __init__
    return importlib.import_module("diffsynth.models.wan_video_vae")


# ---------------------------------------------------------------------------------------------
# (b) sampler


def tiny_velocity(seed: int, lat_hw: tuple[int, int] = (8, 8), frames: int = 2):
    """v(latents, t): our tiny DiT with fixed conditioning and CFG 4.5 (a later clip: motion tokens)."""
    cfg = S2VConfig.tiny()
    torch.manual_seed(seed)  # the same velocity whatever ran before
    dit = randomize_(WanS2VTransformer(cfg), seed=seed).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    h, w = lat_hw
    ctx = torch.randn(1, 16, cfg.text_dim, generator=gen)
    ctx_null = torch.randn(1, 16, cfg.text_dim, generator=gen)
    ref = torch.randn(1, cfg.in_dim, 1, h, w, generator=gen)
    audio = torch.randn(1, cfg.audio_num_layers, cfg.audio_dim, 4 * frames, generator=gen)
    motion = torch.randn(1, cfg.in_dim, cfg.lat_motion_frames, h, w, generator=gen)

    @torch.no_grad()
    def velocity(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = dit(latents, t, ctx, ref, audio, motion_latents=motion)
        uncond = dit(latents, t, ctx_null, ref, audio * 0.0, motion_latents=motion)
        return guide(cond, uncond, 4.5)

    noise = torch.randn(1, cfg.in_dim, frames, h, w, generator=gen)
    return velocity, noise


def sampler_parity(unipc, seed: int, steps: int, shift: float) -> dict[str, dict[str, float]]:
    velocity, noise = tiny_velocity(seed)
    ours_t: list[int] = []

    def logged(latents, t):
        ours_t.append(int(t))
        return velocity(latents, t)

    ours = sample(logged, noise, steps=steps, shift=shift)
    ref, ref_t = reference_sample(unipc, velocity, noise, steps, shift)
    if ours_t != ref_t:
        raise SystemExit(f"timesteps differ: ours {ours_t} reference {ref_t}")
    return {f"{steps} steps, shift {shift}: final latent": rel(ours, ref), "noise -> final change": rel(ref, noise)}


# ---------------------------------------------------------------------------------------------
# (c) one full clip loop


def clip_parity(unipc, seed: int, steps: int, shift: float, size: int, frames: int, clips: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pipe = S2VPipeline.from_checkpoint(write_tiny_checkpoint(Path(tmp) / "ckpt", seed=seed), device="cpu")
    cfg = pipe.config
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(int((clips * frames / 16 + 0.5) * 16000))).astype(np.float32)
    prompt, negative = "a person talks", "blurry, static"
    runs = {}
    for cfg_batch in (False, True):  # CFG as two passes (as the reference runs it), then as one batch of 2
        pipe.cfg_batch = cfg_batch
        clips_out = pipe.generate_clips(
            image, audio, prompt, negative, num_clips=clips, infer_frames=frames, seed=seed, steps=steps, shift=shift
        )
        runs[cfg_batch] = list(clips_out)

    # the reference sequence on DiffSynth's modules
    ds = import_diffsynth_s2v()
    dit = build_diffsynth(ds, cfg).float().eval()
    dit.load_state_dict(pipe.transformer.state_dict(), strict=True)
    vae_mod = import_diffsynth_vae()
    vcfg = pipe.vae.model.config
    vae = vae_mod.VideoVAE_(dim=vcfg.base_dim, z_dim=16, dim_mult=list(vcfg.dim_mult),
                            num_res_blocks=vcfg.num_res_blocks).eval()  # fmt: skip
    vae.load_state_dict(diffusers_to_wan_vae(pipe.vae.model.state_dict(), vcfg.num_res_blocks), strict=True)
    scale = [torch.tensor(LATENT_MEAN), 1.0 / torch.tensor(LATENT_STD)]

    def pad(emb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(emb, (0, 0, 0, cfg.text_len - emb.shape[0]))[None]

    context, context_null = (pad(pipe.text_encoder.encode([p])[0]) for p in (prompt, negative))
    audio_emb = pipe.audio_encoder.conditioning(audio, 16000, clips * frames)
    with torch.no_grad():
        pixels = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div(255.0)
        ref_latents = vae.encode((pixels * 2 - 1)[None, :, None], scale)
        motion_pixels = torch.zeros(1, 3, cfg.motion_frames, size, size)
        motion_latents = vae.encode(motion_pixels, scale)
        pose = torch.zeros(1, cfg.cond_dim, cfg.latent_frames(frames), size // 8, size // 8)
        results = {}
        for r in range(clips):
            g = torch.Generator().manual_seed(seed + r)
            noise = torch.randn(1, cfg.in_dim, cfg.latent_frames(frames), size // 8, size // 8, generator=g)
            clip_audio = audio_emb[..., r * frames : (r + 1) * frames]
            first = r == 0

            def velocity(x, t, clip_audio=clip_audio, first=first, motion=motion_latents):
                t = t.float()  # DiffSynth's pipelines hand its DiT float timesteps (same integral values)
                c = diffsynth_forward(ds, dit, x, t, context, ref_latents, clip_audio, motion, pose, first)
                u = diffsynth_forward(ds, dit, x, t, context_null, ref_latents, clip_audio * 0.0, motion, pose, first)
                return u + 4.5 * (c - u)

            latents, _ = reference_sample(unipc, velocity, noise, steps, shift)
            prefix = ref_latents if first else motion_latents
            video = vae.decode(torch.cat([prefix, latents], dim=2), scale).clamp_(-1, 1)[:, :, -frames:]
            if first:
                video = video[:, :, FIRST_CLIP_DROP:]
            overlap = min(cfg.motion_frames, video.shape[2])
            motion_pixels = torch.cat([motion_pixels[:, :, overlap:], video[:, :, -overlap:]], dim=2)
            motion_latents = vae.encode(motion_pixels, scale)
            ref_uint8 = ((video[0] + 1) / 2 * 255).to(torch.uint8).float()
            kind = "first" if first else "motion latents"
            for cfg_batch, outs in runs.items():
                name = "CFG batch of 2" if cfg_batch else "CFG two passes"
                ours = torch.from_numpy(outs[r].state["motion_frames"][:, -overlap:])  # float frames in [-1, 1]
                results[f"clip {r} ({kind}), {name}: frames"] = rel(ours, video[0, :, -overlap:])
                ours_uint8 = torch.from_numpy(outs[r].frames).permute(3, 0, 1, 2).float()
                results[f"clip {r} ({kind}), {name}: uint8 levels"] = rel(ours_uint8, ref_uint8)
            # control: our two CFG layouts against each other (float32 rounding amplified by the loop)
            results[f"clip {r} control: ours batch of 2 vs two passes"] = rel(
                torch.from_numpy(runs[True][r].state["motion_frames"]),
                torch.from_numpy(runs[False][r].state["motion_frames"]),
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wan", required=True, help="Wan2.2 fm_solvers_unipc.py, or a Wan2.2 git directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--shift", type=float, default=3.0)
    parser.add_argument("--vae-dim", type=int, default=16, help="VAE base width (96 in the release)")
    parser.add_argument("--clip-steps", type=int, default=40, help="steps per clip in (c)")
    parser.add_argument("--skip-clip", action="store_true", help="skip (c)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    unipc = load_wan_unipc(args.wan)
    sections = {
        "VAE (a)": vae_parity(args.seed, args.vae_dim, frames=9, size=64),
        "sampler (b)": sampler_parity(unipc, args.seed, args.steps, args.shift),
    }
    if not args.skip_clip:
        sections["clip loop (c)"] = clip_parity(unipc, args.seed, args.clip_steps, args.shift, 64, 8, 2)
    worst = {"module": 0.0, "clip": 0.0, "control": 0.0}
    for section, rows in sections.items():
        for label, r in rows.items():
            if "change" not in label and "uint8" not in label:
                key = "control" if "control" in label else "clip" if section.startswith("clip") else "module"
                worst[key] = max(worst[key], r["rel_l2"])
            print(
                f"{section:14s} {label:52s} rel L2 {r['rel_l2']:.2e}  max abs {r['max_abs']:.2e}  "
                f"(reference rms {r['ref_rms']:.3g})"
            )
    print(
        f"VAE and sampler: worst relative error {worst['module']:.2e} "
        f"({'PASS' if worst['module'] <= 1e-5 else 'FAIL'} at 1e-5)"
    )
    if not args.skip_clip:
        # 80 float32 DiT calls with guidance 4.5 amplify rounding; the control (our own two CFG layouts)
        # measures that floor, so the reference comparison is judged against it.
        ok = worst["clip"] <= 2 * worst["control"]
        print(
            f"clip loop: worst {worst['clip']:.2e} against the reference, "
            f"float32 floor (control) {worst['control']:.2e}"
            f" ({'PASS' if ok else 'FAIL'}: within 2x the floor)"
        )


if __name__ == "__main__":
    main()
