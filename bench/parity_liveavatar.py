"""Parity of our distilled mode (model/causal.py, model/distilled.py) with LiveAvatar's own code
(issue 20, item 2): a whole multi-clip streaming generation, float32 on CPU, tiny random weights.

    git clone https://github.com/Alibaba-Quark/LiveAvatar /tmp/LiveAvatar    # any checkout
    pip install --target /tmp/la-deps --no-deps peft==0.17.1 einops easydict
    PYTHONPATH=.:/tmp/la-deps python bench/parity_liveavatar.py --liveavatar /tmp/LiveAvatar

Both sides get the same tiny S2V transformer with the same random weights (ours loaded into their
`CausalWanModel_S2V` with strict=True) and the same random LoRA in LiveAvatar's file layout, which
their `WanS2V.add_lora_to_model` merges through PEFT and `DistilledPipeline.use_liveavatar` through ours. Their
`WanS2V.generate` (the single-GPU path of `infinite_inference_single_gpu.sh`: 4 Euler steps,
guidance 0, 48-frame clips of 4 blocks, KV caches per step, the sink pass, rolling caches) then
runs unchanged, with stand-ins for the encoders: the same text embeddings, wav2vec2 features and a
deterministic pixels-to-latents map serve both sides (`Stand-ins` below). Compared: every clip's
latents, which both pipelines hand to their VAE decoder (recorded there), ours run block by block
(their single-GPU order) and pipelined (step i of block n beside step i + 1 of block n - 1, their
multi-GPU order, in one forward here). Two clips of four blocks each fill the ring of every step
twice over, so the run covers the fill and the wrap.

Their code needs a CUDA GPU as written; it is imported from a temporary copy with the patches in
PATCHES, each checked to apply exactly once, each a CPU or float32 matter, not a change of method:
- attention: their `attention` / `flash_attention` call cuDNN and FlashAttention (CUDA only); the
  copy runs the same attention through PyTorch's SDPA in the inputs' dtype (every call on this path
  attends to all keys it is given: their key lengths always equal the tensors' lengths);
- the model's RoPE frequencies are built `.to("cuda")`, and the T5 loader's default device (an
  argument evaluated at import) is the current CUDA device; the copy uses the CPU;
- the sink pass builds an empty video tensor of hard-coded width 5120 (the 14B's) in bf16, and the
  pipeline's caches hard-code 40 heads of 128 and `cuda:0`: the copy uses the model's sizes, dtype
  and the CPU (their `--offload_kv_cache` placement);
- their block casts the residual to bfloat16 before the cross-attention's norm (a rounding in their
  bf16 runs, where the residual is bf16 between blocks anyway); a float32 comparison skips it.
Modules the path imports but never calls (librosa, decord, torchvision's transforms for an image
already at the output size) are given stand-ins; package __init__ files are not run (they import
the training stack). Python's `random` is seeded with the run's seed before their generate; ours
draws the reference's RoPE distance from `random.Random(seed)`: the same sequence.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
import tempfile
import types
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from model.config import S2VConfig
from model.distilled import DistilledPipeline
from model.lora import STYLES
from model.presets import DISTILLED_INFER_FRAMES
from model.tiny import write_liveavatar_lora
from model.transformer import WanS2VTransformer, randomize_

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity_diffsynth import report  # noqa: E402  (the shared verdict at 1e-5)

PKG = "liveavatar/models/wan"
LORA_ALPHA = next(style.alpha for style in STYLES if style.name == "liveavatar")  # their lora_alpha
ATTENTION = f"{PKG}/wan_2_2/modules/attention.py"
PATCHES = [
    (
        ATTENTION,
        "__all__ = [",
        '''import torch.nn.functional as _F


def flash_attention(q, k, v, q_lens=None, k_lens=None, *args, **kwargs):  # parity patch: SDPA on the CPU
    return _F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


__all__ = [''',
    ),
    (ATTENTION, "    if cudnn_require():", "    if False:"),
    (ATTENTION, "    elif FLASH_ATTN_2_AVAILABLE or FLASH_ATTN_3_AVAILABLE:", "    elif True:"),
    (ATTENTION, "def flash_attention(\n    q,", "def _flash_attention_cuda(\n    q,"),
    (f"{PKG}/causal_model_s2v.py", 'dim=1).to("cuda")', "dim=1)"),
    (f"{PKG}/wan_2_2/modules/t5.py", "device=torch.cuda.current_device(),", 'device="cpu",'),
    (
        f"{PKG}/causal_model_s2v.py",
        "torch.zeros([1,5120,nf,height//2,width//2]).to(dtype=torch.bfloat16,device=x[0].device)",
        "torch.zeros([1,self.dim,nf,height//2,width//2]).to(dtype=x[0].dtype,device=x[0].device)",
    ),
    (f"{PKG}/causal_model_s2v.py", "self.norm3(x.to(torch.bfloat16))", "self.norm3(x)"),
    (f"{PKG}/causal_s2v_pipeline.py", 'tgt_device =f"cuda:{gpu_id}"', 'tgt_device = "cpu"'),
]
# the pipeline's cache shapes: 40 heads of 128 (the 14B's), in 8 places
MODEL_HEADS = "self.noise_model.num_heads, self.noise_model.dim // self.noise_model.num_heads]"
HEADS = (f"{PKG}/causal_s2v_pipeline.py", "40, 128]", MODEL_HEADS, 8)


def patched_copy(source: Path, dest: Path) -> Path:
    """Copy their `liveavatar` package to dest and apply PATCHES (each must match exactly once)."""
    shutil.copytree(source / "liveavatar", dest / "liveavatar")
    for rel, old, new in PATCHES:
        path = dest / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"patch for {rel} matches {text.count(old)} times (another LiveAvatar version?): {old!r}")
        path.write_text(text.replace(old, new))
    rel, old, new, count = HEADS
    path = dest / rel
    text = path.read_text()
    if text.count(old) != count:
        raise SystemExit(f"{rel}: {text.count(old)} hard-coded head shapes, expected {count}")
    path.write_text(text.replace(old, new))
    return dest


def _package(name: str, path: Path) -> None:
    """Register a package without running its __init__ (LiveAvatar's import the training stack)."""
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(path)]
    pkg.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    pkg.__spec__.submodule_search_locations = [str(path)]
    sys.modules[name] = pkg


class _Transforms:
    """torchvision.transforms as the pipeline uses it, for an image already at the output size."""

    class Resize:
        def __init__(self, size):
            self.size = size

        def __call__(self, img):
            if min(img.size) != self.size:
                raise ValueError("parity inputs must be at the output size already")
            return img

    class CenterCrop:
        def __init__(self, size):
            self.size = tuple(size)

        def __call__(self, img):
            if img.size[::-1] != self.size:
                raise ValueError("parity inputs must be at the output size already")
            return img

    class ToTensor:  # torchvision's for an RGB PIL image: HWC uint8 -> CHW float / 255
        def __call__(self, img):
            return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous().float().div(255)


def import_liveavatar(root: Path) -> types.ModuleType:
    os.environ["ENABLE_COMPILE"] = "false"  # their torch.compile switch (inference_utils.py)
    for name in ("librosa", "decord"):  # imported at module level, used only by code not run here
        stub = types.ModuleType(name)
        stub.VideoReader = None
        sys.modules.setdefault(name, stub)
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.Resize, tv.transforms.CenterCrop = _Transforms.Resize, _Transforms.CenterCrop
    tv.transforms.ToTensor = _Transforms.ToTensor
    tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
    for module in (tv, tv.transforms, tv.transforms.functional):
        sys.modules[module.__name__] = module
    sys.path.insert(0, str(root))
    for rel in ("liveavatar", "liveavatar/models", PKG, f"{PKG}/wan_2_2", f"{PKG}/wan_2_2/modules",
                f"{PKG}/wan_2_2/modules/s2v", f"{PKG}/wan_2_2/utils", f"{PKG}/wan_2_2/distributed",
                f"{PKG}/wan_2_2/configs", "liveavatar/utils", "liveavatar/utils/router"):  # fmt: skip
        _package(rel.replace("/", "."), root / rel)
    return importlib.import_module("liveavatar.models.wan.causal_s2v_pipeline")


# ---------------------------------------------------------------------------------------------
# Stand-ins: the same encoder outputs for both pipelines


def text_embedding(prompt: str, cfg: S2VConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
    return torch.randn(7 + len(prompt) % 5, cfg.text_dim, generator=gen)


def encode_pixels(video: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """[3, T, H, W] -> [16, 1 + (T - 1) // 4, H / 8, W / 8]: 8x8 means of the first frame and of each
    next 4 frames, mixed into 16 channels (a deterministic stand-in for the Wan VAE encoder)."""
    first, rest = video[:, :1], video[:, 1:]
    groups = [first] + [rest[:, i : i + 4].mean(1, keepdim=True) for i in range(0, rest.shape[1], 4)]
    pooled = torch.nn.functional.avg_pool3d(torch.cat(groups, 1)[None], (1, 8, 8))[0]
    return torch.einsum("oc,cthw->othw", mix, pooled) + 0.1 * mix.sum(1)[:, None, None, None]


class TheirVAE:
    """Wan2_1_VAE's interface (lists in, lists out); records what it decodes."""

    def __init__(self, mix):
        self.mix, self.decoded, self.model = mix, [], nn.Linear(1, 1)
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def encode(self, videos):
        return [encode_pixels(v.float(), self.mix) for v in videos]

    def decode(self, zs):
        self.decoded.append(torch.stack(list(zs)).clone())
        return [torch.zeros(3, 1 + 4 * (z.shape[1] - 1), z.shape[2] * 8, z.shape[3] * 8) for z in zs]


class OurVAE:
    """model.vae.WanVAE's interface; records what it decodes."""

    def __init__(self, mix):
        self.mix, self.decoded = mix, []
        self.device = torch.device("cpu")

    def to(self, device):
        return self

    def encode(self, video):
        return torch.stack([encode_pixels(v.float(), self.mix) for v in video])

    def encode_still(self, image, num_frames):  # WanVAE's: the encode of the image repeated
        return self.encode(image.expand(-1, -1, num_frames, -1, -1))

    def decode(self, latents):
        self.decoded.append(latents.clone())
        b, _, t, h, w = latents.shape
        return torch.zeros(b, 3, 1 + 4 * (t - 1), h * 8, w * 8)


class TheirText:
    def __init__(self, cfg):
        self.cfg, self.model = cfg, nn.Linear(1, 1)

    def __call__(self, texts, device):
        return [text_embedding(t, self.cfg) for t in texts]


class OurText:
    def __init__(self, cfg):
        self.cfg, self.text_len = cfg, cfg.text_len
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(d_model=cfg.text_dim))

    def to(self, device):
        return self

    def encode(self, texts):
        return [text_embedding(t, self.cfg) for t in texts]


class TheirAudio:
    def __init__(self, features, clips):
        self.features, self.clips, self.model = features, clips, nn.Linear(1, 1)

    def extract_audio_feat(self, path, return_all_layers=False):
        return self.features

    def get_audio_embed_bucket_fps(self, z, fps, batch_frames, m):
        return z[0].permute(2, 0, 1), self.clips  # [T, layers, C]; the pipeline permutes it back


class OurAudio:
    def __init__(self, features, cfg):
        self.features, self.num_layers = features, cfg.audio_num_layers
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=cfg.audio_dim))

    def to(self, device):
        return self

    def conditioning(self, waveform, sample_rate, num_frames):
        return self.features[..., :num_frames]


# ---------------------------------------------------------------------------------------------


def their_model(la, cfg: S2VConfig, ours: WanS2VTransformer) -> nn.Module:
    cmod = importlib.import_module("liveavatar.models.wan.causal_model_s2v")
    fields = ("cond_dim", "audio_dim", "num_audio_token", "enable_adain", "adain_mode", "zero_init", "zero_timestep",
              "enable_motioner", "add_last_motion", "enable_tsm", "trainable_token_pos_emb", "motion_token_num",
              "enable_framepack", "framepack_drop_mode", "model_type", "patch_size", "text_len", "in_dim", "dim",
              "ffn_dim", "freq_dim", "text_dim", "out_dim", "num_heads", "num_layers", "window_size", "qk_norm",
              "cross_attn_norm", "eps")  # fmt: skip
    kwargs = {f: getattr(cfg, f) for f in fields}
    kwargs["audio_inject_layers"] = list(cfg.audio_inject_layers)
    torch.manual_seed(0)
    model = cmod.CausalWanModel_S2V(**kwargs).float()
    model.load_state_dict(ours.state_dict(), strict=True)
    return model.eval().requires_grad_(False)


def run_theirs(la, cfg, ours, lora: Path, rank: int, inputs: dict, work: Path) -> list[torch.Tensor]:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("gloo", rank=0, world_size=1)
    config_mod = importlib.import_module("liveavatar.models.wan.wan_2_2.configs.wan_s2v_14B_modified")
    pipe = object.__new__(la.WanS2V)  # their __init__ loads T5, the VAE and the 14B: attributes set here
    pipe.device, pipe.rank, pipe.param_dtype = torch.device("cpu"), 0, torch.float32
    pipe.config = config_mod.s2v_14B
    pipe.num_train_timesteps, pipe.num_frames_per_block = 1000, 3
    pipe.t5_cpu, pipe.init_on_cpu, pipe.is_training = False, False, False
    pipe.single_gpu, pipe.offload_kv_cache = True, True
    pipe.sample_neg_prompt, pipe.motion_frames = pipe.config.sample_neg_prompt, cfg.motion_frames
    pipe.drop_first_motion, pipe.fps, pipe.audio_sample_m = True, 16, 0
    pipe.vae = TheirVAE(inputs["mix"])
    pipe.text_encoder = TheirText(cfg)
    pipe.audio_encoder = TheirAudio(inputs["features"], inputs["clips"])
    model = their_model(la, cfg, ours)
    pipe.noise_model = pipe.add_lora_to_model(
        model, lora_rank=rank, lora_alpha=LORA_ALPHA, lora_target_modules="q,k,v,o,ffn.0,ffn.2",
        init_lora_weights="kaiming", pretrained_lora_path=str(lora), load_lora_weight_only=False,
    )  # fmt: skip
    pipe.noise_model.num_frame_per_block = 3
    image_path = work / "reference.png"
    Image.fromarray(inputs["image"]).save(image_path)
    import random

    random.seed(inputs["seed"])
    h, w = inputs["image"].shape[:2]
    pipe.generate(
        input_prompt=inputs["prompt"], ref_image_path=str(image_path), audio_path=str(work / "unused.wav"),
        num_repeat=inputs["clips"], max_area=h * w, infer_frames=inputs["infer_frames"], shift=3.0,
        sample_solver="euler", sampling_steps=4, guide_scale=0.0, seed=inputs["seed"], offload_model=False,
    )  # fmt: skip
    lat = inputs["infer_frames"] // 4
    return [z[:, :, -lat:] for z in pipe.vae.decoded]


def run_ours(cfg, ours, lora: Path, inputs: dict, pipelined: bool) -> list[torch.Tensor]:
    vae = OurVAE(inputs["mix"])
    pipe = DistilledPipeline(ours, OurText(cfg), OurAudio(inputs["features"], cfg), vae, device="cpu")
    pipe.use_liveavatar(lora)
    frames = inputs["infer_frames"]
    list(
        pipe.generate_clips(
            inputs["image"], np.zeros(16000, np.float32), inputs["prompt"], num_clips=inputs["clips"],
            infer_frames=frames, seed=inputs["seed"], pipelined=pipelined,
        )
    )  # fmt: skip
    return [z[:, :, -(frames // 4) :] for z in vae.decoded]


def make_inputs(cfg: S2VConfig, seed: int, clips: int, infer_frames: int, size: tuple[int, int]) -> dict:
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (h + w))], -1).astype(np.uint8)
    return {
        "seed": seed,
        "clips": clips,
        "infer_frames": infer_frames,
        "prompt": "a person talks to the camera",
        "image": image,
        "mix": torch.randn(cfg.in_dim, 3, generator=gen),
        "features": torch.randn(1, cfg.audio_num_layers, cfg.audio_dim, clips * infer_frames, generator=gen),
    }


def compare(liveavatar: Path, seed: int = 0, clips: int = 2, rank: int = 4) -> dict:
    cfg = S2VConfig.tiny()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        la = import_liveavatar(patched_copy(liveavatar, work / "src"))
        lora = write_liveavatar_lora(work / "liveavatar.safetensors", cfg, rank=rank, seed=seed + 1)
        ours = randomize_(WanS2VTransformer(cfg), seed=seed).float().eval().requires_grad_(False)
        inputs = make_inputs(cfg, seed, clips, DISTILLED_INFER_FRAMES, (64, 128))
        theirs_out = run_theirs(la, cfg, ours, lora, rank, inputs, work)
        result = {}
        for schedule, pipelined in (("block by block", False), ("pipelined", True)):
            ours_out = run_ours(cfg, ours, lora, inputs, pipelined)
            if len(theirs_out) != len(ours_out):
                raise SystemExit(f"clips: theirs {len(theirs_out)}, ours {len(ours_out)}")
            pairs = [*zip(ours_out, theirs_out, strict=True), (torch.cat(ours_out, 2), torch.cat(theirs_out, 2))]
            for i, (a, b) in enumerate(pairs):
                label = f"{schedule}, {'all clips' if i == len(ours_out) else f'clip {i}'}"
                result[label] = {"rel_l2": ((a - b).norm() / b.norm()).item(), "max_abs": (a - b).abs().max().item()}
    return result


def source_commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--liveavatar", type=Path, required=True, help="a LiveAvatar checkout (holds liveavatar/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clips", type=int, default=2, help="48-frame clips of 4 blocks each")
    args = parser.parse_args()
    print(f"LiveAvatar source: {args.liveavatar} at {source_commit(args.liveavatar)}")
    report(compare(args.liveavatar, args.seed, args.clips))


if __name__ == "__main__":
    main()
