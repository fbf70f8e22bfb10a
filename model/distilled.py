"""`DistilledPipeline`: LiveAvatar's 4-step streaming generation on the S2V-14B weights and its LoRA.

LiveAvatar (Alibaba-Quark/LiveAvatar, arXiv 2512.04677) distils Wan2.2-S2V-14B with distribution
matching into a LoRA (`liveavatar.safetensors`) for a block-causal variant of the DiT
(`model/causal.py`) sampled in 4 Euler steps without classifier-free guidance. The loop follows
LiveAvatar's single-GPU path (`liveavatar/models/wan/causal_s2v_pipeline.py`, `WanS2V.generate`,
as `infinite_inference_single_gpu.sh` runs it):

- the reference image (at the output size) is VAE-encoded as 5 identical frames, keeping the
  second latent; the motion condition is the encoding of 73 x 5 copies of those frames (FramePack
  packs its last 19 latents); both stay fixed for the whole segment (no motion is re-encoded);
- one pass over the reference and motion tokens fills the cache's condition keys (`prefill`);
- clip r (48 frames: 12 latent frames, 4 blocks of 3) draws its noise from `seed + r`; each block
  is denoised in 4 Euler steps of diffusers' `FlowMatchEulerDiscreteScheduler(shift=3)` (sigmas
  1, 0.858, 0.602, 0.009, then 0), reading the block's 12 frames of audio; each step writes the
  block into that step's ring of keys and values, so the next blocks see it (the window is one
  clip: 4 blocks);
- the reference's RoPE position follows the block at a distance LiveAvatar draws at random per
  call; the draws come from `random.Random(seed)`, so a segment is reproducible.

Pixels: a clip is decoded after the previous clip's last block of latents (the reference's motion
latents before the first clip), keeping its own 48 frames; the first clip loses its first 3
decoded frames, as LiveAvatar's does. LiveAvatar's single-GPU script decodes each clip after the
re-encoded last 365 frames of the video (92 latents), its real-time path streams the decoder over
the whole latent sequence; both differ from this only in how the decoder is warmed up, and would
cost more than the DiT (or carry the decoder's 2 GB feature caches between clips). The VAE runs in
the DiT's dtype (bf16 by default) for its encodes and decodes, as LiveAvatar's does; exact mode's
VAE stays float32, as Wan2.2's S2V code has it.

Continuation: the KV cache (60 GiB at 480x832 in bf16) is the state a clip hands to the next; far too
large to save with each clip. The state saved is small: the clip index and the clip's last block
of latents. Resuming at clip k re-runs the DiT over clips 0..k-1 without decoding them (their noise,
reference draws and inputs are all seeded), which rebuilds the cache exactly, and checks the
replayed latents against the saved ones (bitwise on CPU; on a GPU as long as the kernels are
deterministic, which forward passes of the same build on the same card are); a mismatch is logged.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from diffusers import FlowMatchEulerDiscreteScheduler

from model.audio_encoder import SAMPLE_RATE
from model.causal import FRAMES_PER_BLOCK, CausalS2V, StreamCache, reference_shift
from model.checkpoint import transformer_config
from model.config import S2VConfig
from model.layout import resolve
from model.lora import Lora, LoraError, load_lora, set_loras
from model.pipeline import FIRST_CLIP_DROP, ClipOutput, S2VPipeline
from model.presets import DISTILLED_INFER_FRAMES, DISTILLED_SHIFT, DISTILLED_STEPS, SpeedConfig
from model.transformer import WanS2VTransformer

log = logging.getLogger(__name__)

__all__ = [
    "DISTILLED_INFER_FRAMES",
    "DISTILLED_SHIFT",
    "DISTILLED_STEPS",
    "DistilledPipeline",
    "check_liveavatar_lora",
    "distilled_schedule",
    "liveavatar_targets",
    "read_liveavatar_lora",
]

REFERENCE_REPEAT = 5  # the reference encoded as 5 frames, the second latent kept
DECODE_CONTEXT = FRAMES_PER_BLOCK  # latent frames decoded before a clip's own (see the module docstring)


def distilled_schedule(
    steps: int = DISTILLED_STEPS, shift: float = DISTILLED_SHIFT
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [steps], sigmas [steps + 1]) of LiveAvatar's sampler, float32 on the CPU."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.float(), scheduler.sigmas.float()


# ---------------------------------------------------------------------------------------------
# LiveAvatar's LoRA (read by model/lora.py with its "liveavatar" key style)

LIVEAVATAR_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")
"""LiveAvatar's lora_target_modules (liveavatar/configs/s2v_causal_sft.yaml); PEFT adapts every
linear layer whose name ends so: the self- and cross-attention and feed-forward of all blocks and
the audio injectors' attention (448 layers of the 14B). Its lora_alpha (64) is the style's alpha."""


def liveavatar_targets(model: nn.Module) -> dict[str, nn.Module]:
    """{path: module} of the layers LiveAvatar's LoRA adapts in `model` (PEFT's suffix match)."""
    return {
        name: module
        for name, module in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in LIVEAVATAR_TARGETS)
    }


def read_liveavatar_lora(path: str | Path, model: nn.Module) -> Lora:
    """LiveAvatar's LoRA file matched strictly to `model` (a meta-device model will do): every key
    on a layer LiveAvatar adapts with factors that fit it (model.lora's checks), and every such
    layer present. LoraError names the file and the first offending keys or layers otherwise (a
    LoRA for another model, or not LiveAvatar's: a Wan T2V LoRA has no audio injectors)."""
    lora = load_lora(path, model, style="liveavatar")
    targets = liveavatar_targets(model)
    other = sorted(set(lora.deltas) - set(targets))
    if other:
        raise LoraError(f"LiveAvatar LoRA {path}: keys on {len(other)} layers LiveAvatar does not adapt: {other[:3]}")
    missing = [name for name in targets if name not in lora.deltas]
    if missing:
        raise LoraError(
            f"LiveAvatar LoRA {path}: covers {len(lora.deltas)} of the {len(targets)} layers LiveAvatar adapts, "
            f"missing {missing[:3]}; not LiveAvatar's distillation LoRA (one for another Wan model?)"
        )
    return lora


def check_liveavatar_lora(path: str | Path, config: S2VConfig | None = None) -> None:
    """Raise LoraError unless `path` is LiveAvatar's LoRA for the S2V transformer of `config`
    (default the 14B); reads only the LoRA (seconds), builds no weights."""
    with torch.device("meta"):
        model = WanS2VTransformer(config or S2VConfig.wan_14b())
    read_liveavatar_lora(path, model)


# ---------------------------------------------------------------------------------------------
# the pipeline


class DistilledPipeline(S2VPipeline):
    """The S2V components with LiveAvatar's LoRA merged into the DiT, and LiveAvatar's streaming loop."""

    _reference: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # see reference_latents

    @classmethod
    def from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint: str | Path,
        lora: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        offload: bool | str = False,
        vae_tiling: bool | None = None,
        attention: str = "auto",
        compile_dit: bool | None = None,
    ) -> DistilledPipeline:
        """S2VPipeline.from_checkpoint (same arguments, no CFG batch) with LiveAvatar's LoRA applied,
        which is checked against the transformer's configuration before the checkpoint is read."""
        check_liveavatar_lora(lora, transformer_config(resolve(checkpoint).dit))
        pipe = super().from_checkpoint(
            checkpoint,
            device,
            dtype,
            offload,
            vae_tiling,
            cfg_batch=False,
            attention=attention,
            compile_dit=compile_dit,
        )
        pipe.use_liveavatar(lora)
        return pipe

    def use_liveavatar(self, lora: str | Path) -> None:
        """Run the DiT with LiveAvatar's LoRA (read once per file; model.lora.set_loras merges it,
        or applies it beside fp8 weights, and gives the base weights back exactly on a switch)."""
        cache = self.__dict__.setdefault("_loras", {})
        key = ("liveavatar", str(Path(lora).resolve()))
        if key not in cache:
            cache[key] = read_liveavatar_lora(key[1], self.transformer)
        set_loras(self.transformer, [(cache[key], 1.0)], device=self.device)

    @torch.no_grad()
    def generate_clips(  # type: ignore[override]
        self,
        image: np.ndarray,
        audio: np.ndarray,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        num_clips: int,
        infer_frames: int = DISTILLED_INFER_FRAMES,
        seed: int = 42,
        steps: int = DISTILLED_STEPS,
        guidance: float = 1.0,
        shift: float = DISTILLED_SHIFT,
        sample_rate: int = SAMPLE_RATE,
        start_clip: int = 0,
        state: dict[str, np.ndarray] | None = None,
        pose: np.ndarray | None = None,
        on_step: Callable[[int, int, int], None] | None = None,
        speed: SpeedConfig | None = None,
        record_steps: bool = False,
        pipelined: bool = True,
    ) -> Iterator[ClipOutput]:
        """Yield clips `start_clip .. num_clips - 1` of one segment (the arguments of
        S2VPipeline.generate_clips). There is no classifier-free guidance: `guidance` above 1 and
        a negative prompt are refused. `infer_frames` must be a multiple of 12 (whole blocks); it is
        also the attention window (LiveAvatar's: 48). on_step(clip, step, steps) counts the
        denoising steps of all blocks of the clip.

        speed: only None or the exact config (the speed options belong to exact sampling); record_steps
        is accepted and ignored (no step log: every step runs). ClipOutput.forwards counts block-steps.
        pipelined: run step i of block n, step i + 1 of block n - 1, ... in one forward (LiveAvatar's
        timestep-forcing pipeline, on one GPU): the same maths as block by block (`False`, LiveAvatar's
        single-GPU order), fewer and fuller forwards, one pass over the weights for up to `steps` blocks
        (what makes block streaming cheap here)."""
        cfg = self.config
        height, width = self._check_image(image)
        lat_frames = infer_frames // 4
        if infer_frames % (4 * FRAMES_PER_BLOCK) or lat_frames < FRAMES_PER_BLOCK:
            raise ValueError(f"distilled mode needs infer_frames a multiple of 12 (whole blocks), got {infer_frames}")
        if speed is not None and speed != SpeedConfig():
            raise ValueError("distilled mode samples LiveAvatar's 4 steps: speed options apply to exact mode only")
        if guidance > 1.0 or negative_prompt:
            raise ValueError("distilled mode has no classifier-free guidance: guidance <= 1 and no negative prompt")
        if num_clips < 1 or not 0 <= start_clip < num_clips:
            raise ValueError(f"need 0 <= start_clip ({start_clip}) < num_clips ({num_clips})")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        lat_h, lat_w = height // 8, width // 8
        blocks = lat_frames // FRAMES_PER_BLOCK
        tail = self._resume_tail(start_clip, state, lat_h, lat_w)
        timesteps, sigmas = distilled_schedule(steps, shift)
        timesteps = timesteps.to(self.device)

        (context,) = self._text_contexts([prompt])
        aenc = self._use(self.audio_encoder)
        audio_cond = aenc.conditioning(audio, sample_rate, num_clips * infer_frames).cpu()
        self._release(aenc)
        vae = self._use(self.vae)  # kept on the GPU for the segment (0.5 GB), except with offload="model"
        ref_latents, motion_latents = (t.to(self.device) for t in self.reference_latents(image))
        if self.offload == "model":
            self._release(vae)

        causal = CausalS2V(self.transformer)
        dit = self._use(self.transformer)
        self._check_cache_fits(causal.cache_bytes(steps=steps, window=blocks, lat_h=lat_h, lat_w=lat_w), width, height)
        cache = causal.new_cache(steps=steps, window=blocks, lat_h=lat_h, lat_w=lat_w, device=self.device)
        ctx = dit.text_context(context, 1)
        causal.prefill(cache, ref_latents, motion_latents, ctx)
        total = num_clips * blocks
        rng = random.Random(seed)  # drawn in LiveAvatar's order: block by block, step by step
        shifts = [[reference_shift(n * FRAMES_PER_BLOCK, rng) for _ in range(steps)] for n in range(total)]
        clips: dict[int, dict] = {}  # clips under way: latents, audio, pose, steps done
        # A decoded clip is handed over after the next forward is queued: on CUDA the GPU computes
        # while the host copies the frames out and the caller writes them (same order on a CPU).
        # With offload="model" (the DiT and the VAE taking turns on the GPU) it goes out at once.
        handover = _Handover(self.device, forwards=blocks * steps)
        try:  # the VAE and the DiT go home whether the segment ends, fails or is abandoned
            if start_clip:
                log.info("rebuilding the KV cache: replaying the DiT over clips 0..%d", start_clip - 1)
            for wave in self._waves(total, steps, cache, pipelined):
                for r in sorted({n // blocks for n, _ in wave} - set(clips)):  # clips starting in this wave
                    generator = torch.Generator(device=self.device).manual_seed(seed + r)
                    noise = torch.randn(
                        (1, cfg.in_dim, lat_frames, lat_h, lat_w), dtype=self.dtype, device=self.device,
                        generator=generator,
                    )  # fmt: skip
                    clips[r] = {
                        "latents": noise.float(),
                        "audio": audio_cond[..., r * infer_frames : (r + 1) * infer_frames].to(self.device, self.dtype),
                        "pose": None if pose is None else self._pose_latents(pose, r, infer_frames),
                        "done": 0,
                    }
                parts = [self._block_inputs(clips[n // blocks], n % blocks) for n, _ in wave]
                x = torch.cat([latents for latents, _, _ in parts])
                v = causal.forward_blocks(
                    cache, x, timesteps[[i for _, i in wave]], ctx, torch.cat([a for _, a, _ in parts]),
                    rows=wave, shifts=[shifts[n][i] for n, i in wave],
                    pose_latents=None if pose is None else torch.cat([p for _, _, p in parts]),
                )  # fmt: skip
                dt = torch.stack([sigmas[i + 1] - sigmas[i] for _, i in wave]).to(self.device).view(-1, 1, 1, 1, 1)
                x = x + dt * v
                yield from handover.take()
                finished = []
                for j, (n, _) in enumerate(wave):
                    r, b = divmod(n, blocks)
                    clips[r]["latents"][:, :, b * FRAMES_PER_BLOCK : (b + 1) * FRAMES_PER_BLOCK] = x[j : j + 1]
                    clips[r]["done"] += 1
                    if on_step is not None and r >= start_clip:
                        on_step(r, clips[r]["done"], blocks * steps)
                    if clips[r]["done"] == blocks * steps:
                        finished.append(r)
                for r in sorted(finished):
                    latents = clips.pop(r)["latents"]
                    if r < start_clip:
                        if r == start_clip - 1:
                            self._check_replay(latents[:, :, -DECODE_CONTEXT:], tail, r)
                        continue
                    if self.offload == "model":  # the DiT and the VAE take turns on the GPU
                        self._release(dit)
                        vae = self._use(self.vae)
                    prefix = motion_latents[:, :, -DECODE_CONTEXT:] if r == 0 else tail.to(self.device)
                    with self._vae_precision():
                        video = vae.decode(torch.cat([prefix.to(latents.device), latents], dim=2))
                    video = video[:, :, -infer_frames:].float()
                    if r == 0:
                        video = video[:, :, FIRST_CLIP_DROP:]
                    if self.offload == "model":
                        self._release(vae)
                        dit = self._use(self.transformer)
                    tail = latents[:, :, -DECODE_CONTEXT:]
                    handover.put(r, video[0], tail)
                    if self.offload == "model":
                        yield from handover.take()
            yield from handover.take()
        finally:
            if self.offload != "model":
                self._release(vae)
            self._release(dit)
            del cache

    @staticmethod
    def _waves(total: int, steps: int, cache: StreamCache, pipelined: bool) -> Iterator[list[tuple[int, int]]]:
        """The (block, step) rows of each forward, in an order that respects both dependencies:
        (n, i) after (n, i - 1) and after (n - 1, i). Sequential: block by block, step by step
        (LiveAvatar's single-GPU loop). Pipelined: at tick T every (T - i, i) at once, as its
        multi-GPU timestep-forcing pipeline runs them (rows that see rings filled to different
        lengths, at a segment's start, go in separate forwards)."""
        if not pipelined:
            yield from ([(n, i)] for n in range(total) for i in range(steps))
            return
        for tick in range(total + steps - 1):
            rows = [(tick - i, i) for i in range(steps) if 0 <= tick - i < total]
            for filled in sorted({cache.filled(n) for n, _ in rows}):
                yield [row for row in rows if cache.filled(row[0]) == filled]

    @staticmethod
    def _block_inputs(clip: dict, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(latents, audio, pose latents) of block b of a clip under way."""
        frames = slice(b * FRAMES_PER_BLOCK, (b + 1) * FRAMES_PER_BLOCK)
        audio = clip["audio"][..., b * 4 * FRAMES_PER_BLOCK : (b + 1) * 4 * FRAMES_PER_BLOCK]
        pose = None if clip["pose"] is None else clip["pose"][:, :, frames]
        return clip["latents"][:, :, frames], audio, pose

    # -- helpers -----------------------------------------------------------------------------

    def reference_latents(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference latent [1, 16, 1, h, w], motion latents [1, 16, 92, h, w]) of uint8 [H, W, 3],
        as LiveAvatar makes them: the image as 5 frames (keep latent 1), and as 73 x 5 frames.

        The last image's latents are kept: a row's segments share its image, and the 365-frame
        encode is the costliest VAE call of a segment."""
        key = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() + str(image.shape)
        if self._reference is not None and self._reference[0] == key:
            return self._reference[1]
        pixels = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div(255.0) * 2 - 1
        frames = pixels[None, :, None].expand(1, 3, REFERENCE_REPEAT, *pixels.shape[1:]).to(self.device)
        with self._vae_precision():
            ref_latents = self.vae.encode(frames)[:, :, 1:].float()
            # = vae.encode(frames.repeat(1, 1, motion_frames, 1, 1)) bit for bit, a third of the work
            motion_frames = REFERENCE_REPEAT * self.config.motion_frames
            motion_latents = self.vae.encode_still(frames[:, :, :1], motion_frames).float()
        self._reference = (key, (ref_latents, motion_latents))
        return ref_latents, motion_latents

    def _vae_precision(self) -> AbstractContextManager:
        """The VAE runs in the DiT's dtype, as LiveAvatar runs it (its causal_s2v_pipeline.py builds
        Wan2_1_VAE with dtype=param_dtype, bfloat16: weights cast and autocast); here by autocast
        alone (its norms stay float32), so the float32 weights that exact mode decodes with (as
        Wan2.2's own S2V code does) are shared untouched."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _resume_tail(self, start_clip: int, state: dict[str, np.ndarray] | None, lat_h: int, lat_w: int):
        if start_clip == 0:
            if state:
                raise ValueError("state given with start_clip=0; a segment's first clip starts from nothing")
            return None
        if not state or "tail_latents" not in state:
            raise ValueError(f"resuming at clip {start_clip} needs the state yielded with clip {start_clip - 1}")
        if "next_clip" in state and int(state["next_clip"]) != start_clip:
            raise ValueError(f"state continues at clip {int(state['next_clip'])}, not at clip {start_clip}")
        tail = np.asarray(state["tail_latents"])
        shape = (self.config.in_dim, DECODE_CONTEXT, lat_h, lat_w)
        if tail.shape != shape or tail.dtype != np.float32:
            raise ValueError(f"state tail_latents: expected float32 {shape}, got {tail.dtype} {tail.shape}")
        return torch.from_numpy(tail.copy())[None]

    def _check_cache_fits(self, nbytes: int, width: int, height: int) -> None:
        """OutOfMemoryError (which the GPU pool answers with an offloading worker) before a KV cache
        that cannot fit is allocated."""
        if self.device.type != "cuda":
            return
        free = torch.cuda.mem_get_info(self.device)[0]
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if nbytes > free:
            hint = " (offload='blocks' keeps the DiT's blocks in host memory)" if self.offload == "none" else ""
            raise torch.cuda.OutOfMemoryError(
                f"distilled mode: the KV cache at {width}x{height} needs {nbytes / 2**30:.1f} GiB of GPU memory, "
                f"{free / 2**30:.1f} GiB are free{hint}"
            )

    @staticmethod
    def _check_replay(replayed: torch.Tensor, saved: torch.Tensor, clip: int) -> None:
        replayed = replayed.cpu()
        if not torch.equal(replayed, saved):
            diff = (replayed - saved).abs().max().item()
            log.warning(
                "replayed clip %d differs from the saved one (max abs %.3g): this device computes differently "
                "from the one that wrote it; later clips continue from the replay",
                clip,
                diff,
            )


class _Handover:
    """Decoded clips waiting on the GPU to be handed to the caller: `put` queues a clip's frames
    (converted to uint8 on the GPU, as _to_uint8 does) and marks them; `take` copies the marked
    clips out on a side stream, which waits for their decode only, not for the forwards queued
    after it, so the host returns them while the GPU goes on. A clip's seconds run from the
    previous hand-over (or the start) to its own."""

    def __init__(self, device: torch.device, forwards: int) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.forwards = forwards  # block passes a clip takes
        self.waiting: list[tuple[int, torch.Tensor, torch.Tensor, torch.cuda.Event | None]] = []
        self.started = time.perf_counter()

    def put(self, clip: int, video: torch.Tensor, tail: torch.Tensor) -> None:
        frames = ((video.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()
        tail = tail.contiguous()  # a copy kernel: queued before the mark, so the side stream waits for it
        decoded = None
        if self.stream is not None:
            decoded = torch.cuda.Event()
            decoded.record(torch.cuda.current_stream(self.stream.device))
        self.waiting.append((clip, frames, tail, decoded))

    def take(self) -> Iterator[ClipOutput]:
        waiting, self.waiting = self.waiting, []
        for clip, frames, tail, decoded in waiting:
            if self.stream is not None:
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(decoded)
                    frames = frames.to("cpu", non_blocking=True)
                    tail = tail.to("cpu", non_blocking=True)
                self.stream.synchronize()  # the GPU tensors stay referenced until here: no early reuse
            state = {"next_clip": np.array(clip + 1, dtype=np.int64), "tail_latents": tail[0].numpy().copy()}
            now = time.perf_counter()
            yield ClipOutput(clip, frames.numpy(), state, now - self.started, forwards=self.forwards)
            self.started = now
