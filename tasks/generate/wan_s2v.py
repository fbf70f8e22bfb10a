"""The `wan-s2v` backend: Wan2.2-S2V-14B through our `model.pipeline.S2VPipeline`.

The pipeline is loaded once per process from an official folder or ComfyUI's files (an s3://
checkpoint is first mirrored locally by `tasks.generate.checkpoints`; `model.layout.resolve` says
which file gives each component) at the chosen precision, and serves every segment routed to this
worker; `self.pipeline.load_timings` says where the loading time went. Each `SegmentJob` maps to
one `generate_clips` call: the normalized image (already cropped to width x height), the
segment's 16 kHz WAV, prompt, negative prompt, seed (clip r uses seed + r), infer_frames, steps,
guidance, the resolution's shift (3 at 480p, 5 at 720p) and the job's speed options; its LoRAs are
set on the pipeline first (model/lora.py: merged into bf16 weights and restored exactly when the
next job has other LoRAs or none). A job in distilled mode goes to
`model.distilled.DistilledPipeline` over the same components, with LiveAvatar's LoRA set the same
way (shift 3, 48-frame clips, no CFG; see docs/distilled.md).

Whole clips: the stage expects `infer_frames` frames from every clip. The reference drops the
first 3 decoded frames of a segment's first clip, so its first clip shows audio frames 3..F-1;
here those 3 frames are filled with copies of the first kept frame. That keeps every frame
on the audio frame it was generated for (frame k <-> audio k / 16 s), at the cost of a 3-frame
(0.19 s) hold at the start of each segment.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence

import av
import numpy as np
import soundfile as sf
import torch
from PIL import Image

from model.audio_encoder import SAMPLE_RATE
from model.checkpoint import transformer_config
from model.distilled import DistilledPipeline, check_liveavatar_lora
from model.layout import resolve
from model.parallel import ParallelGroups, parallelize
from model.pipeline import FIRST_CLIP_DROP, S2VPipeline, prepare_reference
from model.presets import DISTILLED_SHIFT, SpeedConfig
from model.sampler import shift_for
from tasks import storage
from tasks.generate.base import GeneratedClip
from tasks.generate.checkpoints import local_checkpoint
from tasks.records import FPS, MODES, SegmentJob

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[value.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(_DTYPES)}") from None


def read_segment_audio(path: str) -> np.ndarray:
    """The segment's waveform as float32 mono at 16 kHz; anything else is an error, not a resample."""
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: the model needs {SAMPLE_RATE} Hz audio, got {rate} Hz")
    if audio.shape[1] != 1:
        raise ValueError(f"{path}: the model needs mono audio, got {audio.shape[1]} channels")
    return audio[:, 0]


def read_reference(path: str, width: int, height: int) -> np.ndarray:
    """The normalized reference image as uint8 RGB [height, width, 3] (cropped as the reference
    does if the file is not already at the output size)."""
    with Image.open(path) as img:
        return prepare_reference(img, height, width)


def read_pose_video(path: str, start_s: float, frames: int, width: int, height: int) -> np.ndarray:
    """`frames` frames of the pose video at 16 fps from `start_s` (the segment's start), each
    resized and centre-cropped like the reference image; uint8 [T, height, width, 3].

    Frame i is the source frame at time start_s + i / 16 (for 16 or 32 fps sources this is the
    reference's fixed-interval sampling). Fewer frames come back where the video ends; the
    pipeline pads those with -1 as the reference does.
    """
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.base_rate or FPS)
        wanted: dict[int, list[int]] = {}  # source frame -> output frames (several if rate < 16)
        for i in range(frames):
            wanted.setdefault(round((start_s + i / FPS) * rate), []).append(i)
        out: dict[int, np.ndarray] = {}
        for n, frame in enumerate(container.decode(stream)):
            if n > max(wanted):
                break
            if n in wanted:
                rgb = prepare_reference(frame.to_ndarray(format="rgb24"), height, width)
                out.update(dict.fromkeys(wanted[n], rgb))
    count = next((i for i in range(frames) if i not in out), frames)
    if not count:  # the segment lies past the video's end: all padding, as the reference pads
        return np.zeros((0, height, width, 3), np.uint8)
    return np.stack([out[i] for i in range(count)])


class WanS2VGenerator:
    """Generator protocol implementation for Wan2.2-S2V-14B.

    Each job names its mode: "exact" (the released sampler, with the job's speed options and LoRAs)
    or "distilled" (LiveAvatar's 4-step streaming generation, `model.distilled`, with the job's
    `distilled_lora`); one worker serves rows of both, the DiT's weights switching exactly
    (model/lora.py). `mode` / `distilled_lora` here: for jobs that name none, the latter checked
    before the checkpoint is loaded."""

    name = "wan-s2v"

    def __init__(
        self,
        checkpoint: str | Sequence[str],
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        offload: bool = False,
        precision: str | None = None,
        compile_cache_dir: str | None = None,
        mode: str = "exact",
        distilled_lora: str | None = None,
    ):
        """checkpoint: a folder or file (local or s3://), or several, each component taken from the
        first that has it (official folders, ComfyUI files: model.layout.resolve). precision:
        "bf16" | "fp8" | None (fp8 for a scaled-fp8 ComfyUI DiT, else bf16); fp8 is refused before
        loading on a device without fp8 matmuls. compile_cache_dir: a folder where compiled kernels
        are kept for the next worker on the host (default: the cache folder,
        S2V_CACHE_DIR, under compiled/). mode: "exact" or "distilled" (LiveAvatar's LoRA at
        `distilled_lora`, checked against the checkpoint before the weights load)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        if mode == "distilled" and not distilled_lora:
            raise ValueError("mode 'distilled' needs distilled_lora: the path of LiveAvatar's liveavatar.safetensors")
        self.checkpoint, self.mode, self.distilled_lora = checkpoint, mode, distilled_lora
        sources = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
        local = [local_checkpoint(uri) for uri in sources]
        if distilled_lora:
            check_liveavatar_lora(storage.local_copy(distilled_lora), transformer_config(resolve(local).dit))
        self.pipeline = S2VPipeline.from_checkpoint(
            local, device=device, dtype=_dtype(dtype), offload=offload, precision=precision,
            # one compile cache per host by default, so the next worker reuses this one's kernels
            compile_cache_dir=compile_cache_dir or storage.DEFAULT_CACHE / "compiled",
        )  # fmt: skip
        pipe = self.pipeline
        # what the clips depend on besides the job: clips made at another precision or from other
        # weight files are not reused (stage.job_fingerprint)
        self.fingerprint = f"precision={pipe.precision} dtype={pipe.dtype} {pipe.files.describe()}"
        self._distilled: DistilledPipeline | None = None
        self.parallel: ParallelGroups | None = None

    def enable_parallel(self, groups: ParallelGroups) -> None:
        """Split each clip over this rank's process groups (model/parallel.py: sequence parallel, and
        CFG parallel with `groups.cfg`); call on every rank of a worker group, each with the same
        model, and every rank then computes the same clips (tasks/generate/group_rank.py)."""
        parallelize(self.pipeline, groups)
        self.parallel = groups

    def distilled_pipeline(self) -> DistilledPipeline:
        """Distilled mode's pipeline over the same components (built on first use)."""
        if self._distilled is None:
            p = self.pipeline
            self._distilled = DistilledPipeline(
                p.transformer, p.text_encoder, p.audio_encoder, p.vae, device=p.device, offload=p.offload
            )
        return self._distilled

    def clips(
        self,
        job: SegmentJob,
        start_clip: int = 0,
        state: dict[str, np.ndarray] | None = None,
    ) -> Iterator[GeneratedClip]:
        """Yield clips `start_clip .. job.segment.clips - 1` of the job, each `infer_frames` long."""
        if job.fps != FPS:
            raise ValueError(f"Wan2.2-S2V renders at {FPS} fps; the job asks for {job.fps}")
        image = read_reference(job.image, job.width, job.height)
        pose = None
        if job.pose_video:
            frames = job.segment.clips * job.infer_frames
            pose = read_pose_video(job.pose_video, job.segment.start_s, frames, job.width, job.height)
        audio = read_segment_audio(job.audio)
        common = {
            "num_clips": job.segment.clips, "infer_frames": job.infer_frames, "seed": job.segment.seed,
            "steps": job.steps, "guidance": job.guidance, "start_clip": start_clip, "state": state, "pose": pose,
        }  # fmt: skip
        steps = _StepClock()
        common["on_step"] = steps.tick
        mode = job.mode or self.mode
        if mode == "distilled":
            if self.parallel is not None:
                raise ValueError("distilled mode runs on one GPU: its streaming KV caches (model/causal.py) are not "
                                 "split over a worker's GPUs; render such rows with gpus_per_worker=1")
            lora = job.distilled_lora or self.distilled_lora
            if not lora:
                raise ValueError("a distilled job needs LiveAvatar's LoRA: the job's distilled_lora or the generator's")
            if job.loras or job.speed:
                raise ValueError("distilled mode runs LiveAvatar's LoRA and sampling alone: no other LoRA or speed")
            pipeline = self.distilled_pipeline()
            pipeline.use_liveavatar(storage.local_copy(lora))
            outputs = pipeline.generate_clips(
                image, audio, job.prompt, job.negative_prompt, shift=DISTILLED_SHIFT, **common
            )
        else:
            # the job's LoRAs (none: the base weights, restored exactly after a row that had some)
            pipeline = self.pipeline
            pipeline.set_loras([(storage.local_copy(ref.path), ref.strength) for ref in job.loras])
            speed = SpeedConfig.from_dict(job.speed) if job.speed else None
            outputs = pipeline.generate_clips(
                image, audio, job.prompt, job.negative_prompt, shift=shift_for(job.resolution.value), speed=speed,
                **common,
            )  # fmt: skip
        on_cuda = pipeline.device.type == "cuda"
        for out in outputs:
            frames = out.frames
            if out.index == 0:  # restore whole-clip length and audio alignment (see module doc)
                frames = np.concatenate([np.repeat(frames[:1], FIRST_CLIP_DROP, axis=0), frames])
            yield GeneratedClip(
                index=out.index, frames=frames, state=out.state, gpu_s=out.seconds if on_cuda else 0.0,
                forwards=out.forwards, timings=steps.clip_done(),
            )

    @property
    def load_timings(self) -> dict:
        """Where loading the model went (model.timing.LoadTimings), for the worker's record."""
        timings = self.pipeline.load_timings
        return timings.as_dict() if timings is not None else {}


class _StepClock:
    """Times the denoising steps of each clip from the pipeline's on_step callback: when the first
    step ended (cold start: conditioning and compilation come before it) and the later steps' median."""

    def __init__(self) -> None:
        self.start = time.time()
        self.ends: list[float] = []

    def tick(self, clip: int, step: int, steps: int) -> None:
        self.ends.append(time.time())

    def clip_done(self) -> dict[str, float]:
        ends, start = self.ends, self.start
        self.start, self.ends = time.time(), []
        if not ends:
            return {}
        later = [b - a for a, b in zip(ends, ends[1:], strict=False)]
        out = {"first_step_at": round(ends[0], 3), "first_step_s": round(ends[0] - start, 3)}
        if later:
            out["step_s"] = round(statistics.median(later), 4)
        return out
