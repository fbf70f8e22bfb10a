"""`S2VPipeline`: one Wan2.2-S2V checkpoint folder -> clips of a talking-person video.

The clip loop follows the reference (`wan/speech2video.py`, `WanS2V.generate`) step for step:

- the reference image is VAE-encoded once (1 latent frame);
- clip r draws its noise from a generator seeded with `seed + r` (in the DiT's dtype, as the
  reference does, so bf16 runs see the reference's noise), reads audio frames
  [r*F, (r+1)*F) (F = infer_frames) and samples `steps` flow-matching UniPC steps with CFG: the
  unconditional branch uses the negative prompt and zeroed audio;
- the first clip drops the motion tokens (`drop_first_motion`), is decoded together with the
  reference latent and loses the reference frame and its first 3 decoded frames (F - 3 frames);
- later clips condition on the last 73 decoded frames of the video so far (re-encoded by the
  VAE as 19 motion latents), are decoded after those motion latents and keep their last F frames;
- the last 73 frames are carried as float pixels, exactly as the reference carries them.

Audio alignment, as in the reference: the first clip's frames show audio frames 3..F-1 and
clip r >= 1 shows audio frames r*F .. r*F + F - 1.

`generate_clips` yields each clip as soon as it is decoded, with the lossless continuation state
(float32 numpy: the last 73 frames and their motion latents). Passing that state back with
`start_clip=r+1` continues the segment; on CPU the resumed clips are bitwise identical.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.attention import fa4_unavailable
from model.audio_encoder import SAMPLE_RATE, AudioEncoder
from model.checkpoint import fp8_unsupported, load_transformer, quantize_linears_fp8
from model.config import S2VConfig
from model.layout import T5_CHECKPOINT, WAV2VEC_DIR, CheckpointError, CheckpointFiles, resolve
from model.lora import load_lora, set_loras
from model.offload import block_streamer, stream_blocks
from model.sampler import GUIDANCE, STEPS, guide, sample
from model.speed import ClipVelocity, ForwardCounter, SpeedConfig, StepLog, clip_velocity
from model.text_encoder import TextEncoder
from model.timing import LoadTimings
from model.transformer import WanS2VTransformer
from model.vae import WanVAE

log = logging.getLogger(__name__)

FIRST_CLIP_DROP = 3  # decoded frames the reference discards at the start of the first clip
# The model's own negative prompt (wan/configs/wan_s2v_14B.py, sample_neg_prompt).
DEFAULT_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
OFFLOAD_MODES = ("none", "blocks", "model")
TEXT_CACHE = 8  # prompts whose umT5 embeddings a pipeline keeps (4 MB each at 512 x 4096 bf16)
PRECISIONS = ("bf16", "fp8")


def offload_mode(offload: bool | str | None) -> str:
    """Normalise an offload setting: False/None -> "none", True -> "blocks" (the mode that fits
    the smallest GPUs), or one of OFFLOAD_MODES."""
    if offload is None or offload is False:
        return "none"
    if offload is True:
        return "blocks"
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload {offload!r}: expected one of {', '.join(OFFLOAD_MODES)} (or True / False)")
    return offload


def enable_compile_cache(folder: str | Path) -> Path:
    """Keep torch.compile's results in `folder` (process-wide): Inductor's FX-graph cache, the
    AOTAutograd cache and Triton's kernels, so a second process on the host (another worker)
    loads the compiled blocks instead of compiling them again. Set before the first compile."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # read by Inductor at each use
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder


# ---------------------------------------------------------------------------------------------
# inputs


def prepare_reference(image: Image.Image | np.ndarray, height: int, width: int) -> np.ndarray:
    """The reference's preprocessing: resize the short side to min(height, width) (bilinear,
    antialiased), centre-crop to height x width; returns uint8 [height, width, 3]. An image that
    already has the size passes through unchanged."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    if img.size == (width, height):
        return np.asarray(img)
    target = min(height, width)
    w0, h0 = img.size
    size = (target, int(target * h0 / w0)) if w0 <= h0 else (int(target * w0 / h0), target)
    img = img.resize(size, Image.Resampling.BILINEAR)
    if size[0] < width or size[1] < height:
        raise ValueError(f"reference image {w0}x{h0} cannot be centre-cropped to {width}x{height}")
    left = int(round((size[0] - width) / 2.0))
    top = int(round((size[1] - height) / 2.0))
    return np.asarray(img.crop((left, top, left + width, top + height)))


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3], scaled and truncated as the reference saves it."""
    x = ((video.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


@dataclass
class ClipOutput:
    """One finished clip."""

    index: int
    frames: np.ndarray
    """uint8 [T, H, W, 3]: F - 3 frames for the first clip, F for the others."""
    state: dict[str, np.ndarray] = field(default_factory=dict)
    """Lossless continuation state: 'motion_frames' float32 [3, 73, H, W] in [-1, 1],
    'motion_latents' float32 [16, 19, H/8, W/8] (omitted after the last clip), 'next_clip'."""
    seconds: float = 0.0
    """Wall seconds of this clip on the device (synchronised on CUDA)."""
    forwards: int = 0
    """DiT passes actually run for this clip, counted in batch rows (a CFG batch of 2 counts 2):
    80 for 40 exact steps with guidance; fewer with the speed options of model.speed."""
    steps: StepLog | None = None
    """Per step: guided or not, computed or reused (and MagCache's ratios when recorded); None
    for exact sampling unless `record_steps` was asked for."""


def _check_precision(precision: str | None, files: CheckpointFiles, device: torch.device) -> str:
    """The DiT precision to load (None: fp8 for a scaled-fp8 file, else bf16); CheckpointError,
    naming the setting and the fix, when fp8 is asked of a device without fp8 matmuls."""
    chosen = precision or ("fp8" if files.dit_fp8 else "bf16")
    if chosen == "fp8" and (why := fp8_unsupported(device)):
        source = f" (the default for {files.dit.name}, which stores fp8 weights)" if precision is None else ""
        expand = f"; {files.dit.name}'s fp8 weights are then expanded to bf16 on load" if files.dit_fp8 else ""
        raise CheckpointError(
            f"precision fp8{source} needs fp8 matmuls, which need a CUDA GPU of compute capability 8.9+ "
            f"(L40S, H100, ...), but {why}: set precision = bf16{expand}"
        )
    return chosen


def _has_fp8(model: torch.nn.Module) -> bool:
    return any(p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# the pipeline


class S2VPipeline:
    """Text encoder + audio encoder + VAE + DiT, and the reference's clip loop."""

    def __init__(
        self,
        transformer: WanS2VTransformer,
        text_encoder: TextEncoder,
        audio_encoder: AudioEncoder,
        vae: WanVAE,
        device: torch.device | str = "cpu",
        offload: bool | str = False,
        cfg_batch: bool = True,
        compile_dit: bool = False,
    ):
        self.transformer = transformer.eval().requires_grad_(False)
        self.config: S2VConfig = transformer.config
        self.text_encoder = text_encoder
        self.audio_encoder = audio_encoder
        self.vae = vae
        self.device = torch.device(device)
        self.offload = offload_mode(offload)
        self.cfg_batch = cfg_batch
        self.precision = "fp8" if _has_fp8(transformer) else "bf16"
        self.files: CheckpointFiles | None = None  # set by from_checkpoint
        self.cfg_parallel = None  # this rank's guidance branch, a CfgParallel (model.parallel.parallelize)
        self.load_timings: LoadTimings | None = None  # set by from_checkpoint
        self.last_conditioning_s = 0.0  # seconds the last generate_clips took before its first step
        if audio_encoder.num_layers != self.config.audio_num_layers:
            raise CheckpointError(
                f"{WAV2VEC_DIR}: wav2vec2 gives {audio_encoder.num_layers} hidden states but the DiT averages "
                f"{self.config.audio_num_layers} (another model's audio encoder?)"
            )
        if audio_encoder.model.config.hidden_size != self.config.audio_dim:
            raise CheckpointError(
                f"{WAV2VEC_DIR}: wav2vec2 width {audio_encoder.model.config.hidden_size} != DiT audio_dim "
                f"{self.config.audio_dim}"
            )
        if text_encoder.model.config.d_model != self.config.text_dim:
            raise CheckpointError(
                f"{T5_CHECKPOINT}: umT5 width {text_encoder.model.config.d_model} != DiT text_dim "
                f"{self.config.text_dim}"
            )
        text_encoder.text_len = self.config.text_len
        home = torch.device("cpu") if self.offload != "none" else self.device
        for part in (text_encoder, audio_encoder, vae):
            part.to(home)
        if self.offload == "blocks":
            if block_streamer(transformer) is None:
                stream_blocks(transformer, self.device)
        elif block_streamer(transformer) is not None:
            raise ValueError("this transformer streams its blocks; build the pipeline with offload='blocks'")
        else:
            transformer.to(home)
        if compile_dit:  # compiled lazily, at the first forward of each token layout (~20 s on an H100)
            transformer.compile_blocks(dynamic=False)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | Sequence[str | Path],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        offload: bool | str = False,
        vae_tiling: bool | None = None,
        cfg_batch: bool | None = None,
        attention: str = "auto",
        compile_dit: bool | None = None,
        precision: str | None = None,
        compile_cache_dir: str | Path | None = None,
    ) -> S2VPipeline:
        """Load every component from local checkpoint files: one path or several, each an official
        folder, ComfyUI files (a flat folder, a ComfyUI models/ tree, or single files), every
        component taken from the first that has it (model.layout.resolve). Every file is checked
        (headers only) before any weight is read; CheckpointError names what is wrong.

        device: default CUDA when available, else CPU. dtype of the DiT and T5: default bf16 on
        CUDA, float32 on CPU. The VAE and wav2vec2 run in float32, as in the reference.
        precision: the DiT's block linears, "bf16" (in `dtype`) or "fp8" (fp8 weights and fp8
        matmuls, Fp8Linear: a scaled-fp8 ComfyUI file stays fp8, a bf16 checkpoint is quantized at
        load); None: "fp8" for a scaled-fp8 DiT file, else "bf16". fp8 needs a GPU of compute
        capability 8.9+ (L40S, H100) and is refused elsewhere before any weight is read; "bf16"
        with a scaled-fp8 file expands its weights to `dtype` at load. The umT5 file's scaled-fp8
        weights are always expanded to `dtype`.
        offload (see OFFLOAD_MODES): "none" (False) keeps everything on the GPU; "blocks" (True)
        streams the DiT's blocks from pinned CPU memory (model.offload) and moves the encoders and
        the VAE to the GPU only while they work; "model" moves whole components, the DiT once per clip.
        cfg_batch: run both CFG branches as one batch of 2 (one pass over the weights; about 7 GiB
        more activations at 480p). Default: on without offload; with offload two passes, where
        memory matters more (as fast at 480p on an H100).
        vae_tiling: decode frames larger than 480x832 in tiles (WanVAE.enable_tiling); default on
        with offload (720p then stays under 22 GiB), off otherwise.
        attention: the DiT's self-attention kernel, "sdpa" or "fa4" (WanS2VTransformer.set_attention);
        "auto" takes FA4 where it runs (a Hopper/Blackwell GPU with the flash-attn-4 package; about 9 %
        faster per forward on an H100) and SDPA elsewhere.
        compile_dit: torch.compile the DiT's blocks (default on CUDA): 6 % faster forwards at 480p on
        an H100 for about 20 s of compilation per token layout (first clip, later clip) per process.
        compile_cache_dir: keep compiled kernels there (enable_compile_cache), so later processes
        on the host reuse them.

        `pipe.load_timings` (model.timing.LoadTimings) says where the loading time went.

        Memory at 480x832, 80 frames, bf16 on an H100 (figures and method: docs/benchmarks.md):
        without offload 45 GiB resident and a 54 GiB peak per clip (80 GB GPUs); with "blocks"
        6 GiB resident and an 18 GiB peak (umT5 at work), no slower per step, and 720p under a
        22 GiB cap with VAE tiling (24 GB GPUs); with "model" a 35 GiB peak (the bf16 DiT alone is
        30 GiB) and about 30 s more per clip.
        """
        started = time.perf_counter()
        timings = LoadTimings()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        mode = offload_mode(offload)
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        with timings.phase("check"):
            files = resolve(checkpoint, precision)
            precision = _check_precision(precision, files, device)
        if compile_cache_dir is not None:
            enable_compile_cache(compile_cache_dir)
        load_to = torch.device("cpu") if mode != "none" else device
        with timings.component("dit", load_to):
            transformer = load_transformer(
                files.dit, device=load_to, dtype=dtype, fp8="keep" if precision == "fp8" else "dequantize",
                fp8_device=device, timings=timings,
            )  # fmt: skip
            if precision == "fp8" and not files.dit_fp8:
                with timings.phase("build", device):
                    quantize_linears_fp8(transformer, work_device=device)
        with timings.component("text_encoder", load_to):
            text_encoder = TextEncoder.from_checkpoint(
                files.text_encoder, files.tokenizer, device=load_to, dtype=dtype, timings=timings
            )
        with timings.component("audio_encoder", load_to):
            audio_encoder = AudioEncoder.from_checkpoint(
                files.audio_encoder, files.audio_config, device=load_to, timings=timings
            )
        with timings.component("vae", load_to):
            vae = WanVAE.from_checkpoint(files.vae, load_to, timings=timings)
        if (mode != "none") if vae_tiling is None else vae_tiling:
            vae.enable_tiling()
        batch = (mode == "none") if cfg_batch is None else cfg_batch
        compile_dit = device.type == "cuda" if compile_dit is None else compile_dit
        with timings.component("setup", device):
            with timings.phase("to_device", device):
                pipe = cls(transformer, text_encoder, audio_encoder, vae, device=device, offload=mode, cfg_batch=batch)
            with timings.phase("build"):  # compiles lazily, at the first forward (timed by the caller)
                if compile_dit:
                    transformer.compile_blocks(dynamic=False)
                if attention == "auto":
                    attention = "sdpa" if fa4_unavailable(device) else "fa4"
                transformer.set_attention(attention, device)
        timings.total_s = time.perf_counter() - started
        pipe.files, pipe.load_timings = files, timings
        log.info(
            "loaded %s in %.1f s (%s); precision %s; self-attention %s; offload %s; compiled %s",
            files.describe(), timings.total_s, timings.as_dict(), precision, attention, mode, compile_dit,
        )  # fmt: skip
        return pipe

    # -- device placement -------------------------------------------------------------------

    def _use(self, part):
        """Move `part` to the compute device (a no-op without offload, and for a streamed DiT)."""
        if self._moves(part):
            part.to(self.device)
        return part

    def _release(self, part) -> None:
        if self._moves(part):
            part.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _moves(self, part) -> bool:
        return self.offload == "model" or (self.offload == "blocks" and part is not self.transformer)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- generation -------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.compute_dtype

    def set_loras(self, loras: Sequence[tuple[str | Path, float]]) -> None:
        """Run the DiT with these LoRA files, each at its strength ([]: the base weights, exactly).

        Files are read and matched once per process (model.lora.load_lora: a LoRA whose keys do
        not fit the model raises LoraError naming them); switching between rows costs a copy of
        the touched weights, and nothing when the set is unchanged."""
        cache = self.__dict__.setdefault("_loras", {})
        parsed = []
        for path, strength in loras:
            key = str(Path(path).resolve())
            if key not in cache:
                cache[key] = load_lora(key, self.transformer)
            parsed.append((cache[key], float(strength)))
        set_loras(self.transformer, parsed, device=self.device)

    def clip_frames(self, clip: int, infer_frames: int) -> int:
        """Frames clip `clip` yields: F - 3 for the first, F after."""
        return infer_frames - FIRST_CLIP_DROP if clip == 0 else infer_frames

    @torch.no_grad()
    def generate_clips(
        self,
        image: np.ndarray,
        audio: np.ndarray,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        num_clips: int,
        infer_frames: int = 80,
        seed: int = 42,
        steps: int = STEPS,
        guidance: float = GUIDANCE,
        shift: float = 3.0,
        sample_rate: int = SAMPLE_RATE,
        start_clip: int = 0,
        state: dict[str, np.ndarray] | None = None,
        pose: np.ndarray | None = None,
        on_step: Callable[[int, int, int], None] | None = None,
        speed: SpeedConfig | None = None,
        record_steps: bool = False,
    ) -> Iterator[ClipOutput]:
        """Yield clips `start_clip .. num_clips - 1` of one segment, each as soon as it is done.

        image: uint8 [H, W, 3], already cropped to the output size (H, W multiples of 16).
        audio: float 16 kHz mono waveform of exactly this segment.
        state: the state yielded with clip `start_clip - 1` (None when start_clip is 0).
        pose: optional uint8 [T, H, W, 3] pose video (DWPose renders) at 16 fps and the output
        size, starting at the segment's first frame; clip r uses frames [r*F, (r+1)*F), padded
        with -1 past its end as the reference does. Without it the pose condition is zeros.
        on_step(clip, step, steps) is called after every denoising step.
        speed: step caching, CFG truncation, fewer steps (model.speed; its steps, when set, cap
        `steps`; its shift replaces `shift`). None or an exact config samples as the reference does.
        record_steps: log every step (and MagCache's magnitude ratios) in ClipOutput.steps.
        """
        if speed is not None:
            steps = speed.sampling_steps(steps)
            shift = speed.shift or shift
        cfg = self.config
        height, width = self._check_image(image)
        if infer_frames <= FIRST_CLIP_DROP or infer_frames % 4:
            raise ValueError(f"infer_frames must be a multiple of 4 above {FIRST_CLIP_DROP}, got {infer_frames}")
        if num_clips < 1 or not 0 <= start_clip < num_clips:
            raise ValueError(f"need 0 <= start_clip ({start_clip}) < num_clips ({num_clips})")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        lat_h, lat_w = height // 8, width // 8
        if pose is not None and (
            not isinstance(pose, np.ndarray) or pose.dtype != np.uint8 or pose.ndim != 4
            or pose.shape[1:] != (height, width, 3)
        ):  # fmt: skip
            got = f"{pose.dtype} {pose.shape}" if isinstance(pose, np.ndarray) else type(pose).__name__
            raise ValueError(f"pose video must be uint8 [T, {height}, {width}, 3], got {got}")
        motion = self._initial_motion(start_clip, state, height, width)
        conditioning_started = time.perf_counter()

        # conditioning shared by every clip of the segment
        context, context_null = self._text_contexts([prompt, negative_prompt or DEFAULT_NEGATIVE_PROMPT])

        aenc = self._use(self.audio_encoder)
        audio_cond = aenc.conditioning(audio, sample_rate, num_clips * infer_frames).cpu()
        self._release(aenc)

        vae = self._use(self.vae)
        pixels = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div(255.0)
        ref_latents = vae.encode((pixels * 2 - 1)[None, :, None].to(self.device))
        self._release(vae)
        self._sync()
        self.last_conditioning_s = time.perf_counter() - conditioning_started

        lat_frames = cfg.latent_frames(infer_frames)
        for r in range(start_clip, num_clips):
            started = time.perf_counter()
            generator = torch.Generator(device=self.device).manual_seed(seed + r)
            noise = torch.randn(
                (1, cfg.in_dim, lat_frames, lat_h, lat_w), dtype=self.dtype, device=self.device, generator=generator
            )
            clip_audio = audio_cond[..., r * infer_frames : (r + 1) * infer_frames].to(self.device, self.dtype)
            first = r == 0  # drop_first_motion
            if not first and motion["latents"] is None:
                vae = self._use(self.vae)
                motion["latents"] = vae.encode(motion["frames"].to(self.device))
                self._release(vae)
            motion_latents = None if first else motion["latents"].to(self.device)
            pose_latents = None if pose is None else self._pose_latents(pose, r, infer_frames)

            dit = self._use(self.transformer)
            guided, cond_only = self._velocity_fns(
                dit, context, context_null, ref_latents, clip_audio, motion_latents, pose_latents, first, guidance
            )
            velocity = clip_velocity(guided, cond_only, speed, steps, record_steps)
            step_cb = (lambda i, n, r=r: on_step(r, i, n)) if on_step else None
            with ForwardCounter(dit) as counter:
                latents = sample(velocity, noise.float(), steps=steps, shift=shift, on_step=step_cb)
            self._release(dit)

            vae = self._use(self.vae)
            prefix = ref_latents if first else motion_latents
            video = vae.decode(torch.cat([prefix.to(latents.device), latents], dim=2))[:, :, -infer_frames:]
            if first:
                video = video[:, :, FIRST_CLIP_DROP:]
            overlap = min(cfg.motion_frames, video.shape[2])
            # the carry is built where the video is and encoded from there: no round trip of its
            # ~350 MB (480p) through host memory before the encode; the host copy is the state
            older = motion["frames"][:, :, overlap:].to(video.device)  # empty once a clip has >= 73 frames
            carry = torch.cat([older, video[:, :, -overlap:].float()], dim=2)
            last = r == num_clips - 1
            latents_carry = None if last else vae.encode(carry)
            frames_carry = carry.cpu()
            self._release(vae)
            self._sync()
            motion = {"frames": frames_carry, "latents": latents_carry}

            new_state = {
                "motion_frames": frames_carry[0].numpy().copy(),
                "next_clip": np.array(r + 1, dtype=np.int64),
            }
            if latents_carry is not None:
                new_state["motion_latents"] = latents_carry[0].float().cpu().numpy()
            log = velocity.log if isinstance(velocity, ClipVelocity) else None
            yield ClipOutput(r, _to_uint8(video[0]), new_state, time.perf_counter() - started, counter.count, log)

    # -- helpers -----------------------------------------------------------------------------

    def _check_image(self, image: np.ndarray) -> tuple[int, int]:
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"reference image must be uint8 [H, W, 3] RGB, got {got}")
        height, width = image.shape[:2]
        if height % 16 or width % 16 or min(height, width) < 64:
            raise ValueError(
                f"reference image {width}x{height}: width and height must be multiples of 16 and at least 64 "
                "(crop it with prepare_reference first)"
            )
        return height, width

    def _initial_motion(self, start_clip: int, state: dict[str, np.ndarray] | None, height: int, width: int) -> dict:
        """The carried frames (and latents, when known) before clip `start_clip`."""
        frames_shape = (3, self.config.motion_frames, height, width)
        if start_clip == 0:
            if state:
                raise ValueError("state given with start_clip=0; a segment's first clip starts from nothing")
            return {"frames": torch.zeros((1, *frames_shape)), "latents": None}
        if not state or "motion_frames" not in state:
            raise ValueError(f"resuming at clip {start_clip} needs the state yielded with clip {start_clip - 1}")
        if "next_clip" in state and int(state["next_clip"]) != start_clip:
            raise ValueError(f"state continues at clip {int(state['next_clip'])}, not at clip {start_clip}")
        frames = np.asarray(state["motion_frames"])
        if frames.shape != frames_shape or frames.dtype != np.float32:
            raise ValueError(f"state motion_frames: expected float32 {frames_shape}, got {frames.dtype} {frames.shape}")
        latents = None
        if "motion_latents" in state:
            lat = np.asarray(state["motion_latents"])
            lat_shape = (self.config.in_dim, self.config.lat_motion_frames, height // 8, width // 8)
            if lat.shape != lat_shape or lat.dtype != np.float32:
                raise ValueError(f"state motion_latents: expected float32 {lat_shape}, got {lat.dtype} {lat.shape}")
            latents = torch.from_numpy(lat.copy())[None]
        return {"frames": torch.from_numpy(frames.copy())[None], "latents": latents}

    def _text_contexts(self, prompts: list[str]) -> list[torch.Tensor]:
        """The padded umT5 embedding of each prompt on the device ([1, text_len, D]). The last
        TEXT_CACHE prompts' are kept: a batch's segments mostly share their prompts, and with
        offload umT5 (11 GB) would otherwise be moved to the GPU and back for every segment."""
        cache: OrderedDict[str, torch.Tensor] = self.__dict__.setdefault("_text_cache", OrderedDict())
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            enc = self._use(self.text_encoder)
            for prompt in missing:
                cache[prompt] = self._pad_text(enc.encode([prompt])[0]).to(self.device)
            self._release(enc)
        for prompt in prompts:
            cache.move_to_end(prompt)
        while len(cache) > TEXT_CACHE:
            cache.popitem(last=False)
        return [cache[p] for p in prompts]

    def _pad_text(self, emb: torch.Tensor) -> torch.Tensor:
        """[L, D] -> [1, text_len, D], zero-padded as the DiT would (lets CFG rows share a batch)."""
        return F.pad(emb, (0, 0, 0, self.config.text_len - emb.shape[0]))[None].to(self.dtype)

    def _pose_latents(self, pose: np.ndarray, clip: int, infer_frames: int) -> torch.Tensor:
        """VAE latents of clip `clip`'s pose frames, as the reference builds them: the chunk in
        [-1, 1] (padded with -1), its first frame prepended, encoded, first latent dropped."""
        chunk = pose[clip * infer_frames : (clip + 1) * infer_frames]
        video = torch.full((1, 3, infer_frames, *pose.shape[1:3]), -1.0)
        if len(chunk):
            video[:, :, : len(chunk)] = torch.from_numpy(np.array(chunk)).permute(3, 0, 1, 2).float() / 255 * 2 - 1
        vae = self._use(self.vae)
        latents = vae.encode(torch.cat([video[:, :, :1], video], dim=2).to(self.device))[:, :, 1:]
        self._release(vae)
        return latents

    def _velocity_fns(self, dit, context, context_null, ref_latents, audio, motion_latents, pose, first, guidance):
        """The guided flow prediction v(latents, t) for one clip (None when guidance <= 1, where the
        reference skips the unconditional pass) and the conditional one alone."""
        ref = ref_latents.to(self.device)
        kwargs = {"motion_latents": motion_latents, "pose_latents": pose, "drop_motion_frames": first}

        def cond_only(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return dit(latents, t, context, ref, audio, **kwargs)

        if guidance <= 1.0:
            return None, cond_only
        if self.cfg_parallel is not None:  # one branch here, the other on the paired rank
            pair = self.cfg_parallel
            mine = (context, audio) if pair.branch == 0 else (context_null, audio * 0.0)

            def paired(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                cond, uncond = pair.combine(dit(latents, t, mine[0], ref, mine[1], **kwargs))
                return guide(cond, uncond, guidance)

            return paired, cond_only
        if self.cfg_batch:  # both branches as one batch of 2 (one pass over the weights)
            both_ctx = torch.cat([context, context_null])
            both_audio = torch.cat([audio, audio * 0.0])

            def batched(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                out = dit(latents.expand(2, -1, -1, -1, -1), t, both_ctx, ref, both_audio, **kwargs)
                return guide(out[0:1], out[1:2], guidance)

            return batched, cond_only

        def two_pass(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            cond = dit(latents, t, context, ref, audio, **kwargs)
            uncond = dit(latents, t, context_null, ref, audio * 0.0, **kwargs)
            return guide(cond, uncond, guidance)

        return two_pass, cond_only
