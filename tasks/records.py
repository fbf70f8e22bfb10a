"""Records that cross stage boundaries.

Every stage imports its inputs and outputs from here, so a reader can follow one row
from CSV line to MP4 by the types alone. They are pydantic models because they are
persisted (cache markers, report.json, Prefect artifacts) and must round-trip as JSON.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FPS = 16
"""Output frame rate of Wan2.2-S2V (frames per second)."""
MODEL_SAMPLE_RATE = 16_000
"""Sample rate of the audio the S2V audio encoder (wav2vec2) takes."""
INFER_FRAMES = 80
"""Frames per clip by default (a multiple of 4)."""
Mode = Literal["exact", "distilled"]
"""How a row is sampled: 'exact' (the released sampler: UniPC steps with CFG, speed presets) or
'distilled' (LiveAvatar's 4-step streaming generation with its LoRA, model/distilled.py)."""
MODES: tuple[str, ...] = Mode.__args__

Precision = Literal["bf16", "fp8"]
"""Weights of the DiT's block linears: bf16, or fp8 (e4m3 with scales; GPUs with fp8 support only)."""
DEFAULT_PRECISION: Precision = "bf16"
PRECISIONS: tuple[str, ...] = ("bf16", "fp8")

GPU_SECONDS = (
    "GPU seconds: wall-clock seconds a generator worker (one GPU) was held by the segments, every attempt "
    "included: on the pool from dispatching an attempt to its outcome, lost workers included; in the flow "
    "process from a segment taking the process's generator to giving it back. Clip encoding and state "
    "writes count (the GPU waits for them); queueing and model loading do not. `est_gpu_s` of the plan "
    "estimates the same quantity for one attempt per segment"
)
"""The one definition of GPU time used by the report, `s2v-batch status`, the Prefect artifacts and the planner."""


def row_error(row: int, row_id: str | None, where: str, reason: str) -> str:
    """The one line that names a failed row, where it failed (a column or a stage) and why."""
    who = f"row {row}" + (f" (id {row_id!r})" if row_id else "")
    return f"{who}, {where}: {reason}"


class Resolution(StrEnum):
    """Output size bucket; the real H×W follows the reference image's aspect."""

    P480 = "480p"
    P720 = "720p"

    @property
    def max_area(self) -> int:
        return {"480p": 480 * 832, "720p": 720 * 1280}[self.value]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ManifestRow(Record):
    """One validated manifest row; every path is resolved to an absolute URI."""

    row: int = Field(description="1-based data row number in the manifest (header excluded)")
    id: str
    audio: str
    image: str
    script: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    pose_video: str | None = None
    language: str | None = Field(None, description="expected spoken language, ISO 639-1")
    resolution: Resolution = Resolution.P480
    seed: int = 42
    steps: int = 40
    guidance: float = 4.5
    output: str = Field(description="video path relative to the output folder")
    webhook: str | None = Field(None, description="URL told when this row finishes or fails")
    preset: str | None = Field(None, description="speed preset for this row (None: the batch's)")
    lora: list[str] | None = Field(None, description="LoRA files for this row (None: the batch's; []: none)")
    lora_strength: list[float] | None = Field(None, description="one strength, or one per LoRA (None: the batch's)")
    mode: Mode | None = Field(None, description="'exact' or 'distilled' for this row (None: the batch's)")
    # Left out of dumps while unset, so done markers fingerprinted before the column existed stay valid.
    precision: Precision | None = Field(
        None, description="the row's model precision; unset: the batch's", exclude_if=lambda v: v is None
    )


class RowIssue(Record):
    """A problem with one row, always naming the row, the column and the cause."""

    row: int
    id: str | None = None
    field: str
    reason: str

    def __str__(self) -> str:
        return row_error(self.row, self.id, f"column '{self.field}'", self.reason)


class AudioQC(Record):
    duration_s: float = Field(description="duration after trimming, both files")
    source_duration_s: float
    source_sample_rate: int
    source_channels: int
    source_codec: str
    integrated_lufs: float = Field(description="loudness of the source, EBU R128")
    peak_dbfs: float = Field(description="sample peak of the source")
    clipping_ratio: float = Field(description="share of source samples at full scale")
    trimmed_start_s: float
    trimmed_end_s: float
    master_lufs: float | None = Field(None, description="loudness of the master after normalization")


class ImageQC(Record):
    source_width: int
    source_height: int
    face_found: bool
    face_height_ratio: float | None = Field(None, description="face height / output frame height")
    sharpness: float = Field(description="variance of the Laplacian of the output crop")
    crop_box: tuple[int, int, int, int] = Field(description="left, top, right, bottom in resized source")


class NormalizedAssets(Record):
    """What normalization hands to every later stage (all local files)."""

    row_id: str
    audio_16k: str = Field(description="16 kHz mono s16 WAV for the model")
    audio_master: str = Field(description="loudness-normalized master WAV for the final mux")
    image: str = Field(description="RGB PNG cropped to width×height")
    width: int
    height: int
    duration_s: float
    num_samples: int = Field(description="samples of audio_16k")
    script: str | None = None
    audio_qc: AudioQC
    image_qc: ImageQC


class WordTiming(Record):
    word: str
    start: float
    end: float
    score: float | None = None
    found: bool = Field(True, description="false when the audio does not contain the word (start = end)")
    note: str | None = Field(None, description="why the word was not found, or how it was placed")


class SpeechAnalysis(Record):
    """Language checks and word timings for one row."""

    aligner: str = Field(description="which aligner produced the timings")
    approximate: bool = Field(description="true when timings are not from a real alignment")
    words: list[WordTiming] = Field(default_factory=list)
    script_language: str | None = None
    audio_language: str | None = None
    fit_score: float | None = None
    flags: list[str] = Field(default_factory=list)


class Segment(Record):
    """An independently generated stretch of a row's audio."""

    index: int
    start_sample: int
    end_sample: int
    start_s: float
    end_s: float
    frames: int = Field(description="ceil(duration × fps)")
    clips: int = Field(description="ceil(frames / infer_frames)")
    seed: int
    est_gpu_s: float | None = Field(None, description="estimated " + GPU_SECONDS)


class Plan(Record):
    row_id: str
    fps: int = FPS
    infer_frames: int = INFER_FRAMES
    sample_rate: int = MODEL_SAMPLE_RATE
    width: int
    height: int
    segments: list[Segment]
    approximate: bool = Field(False, description="true when cuts were not placed from word timings")
    fit_score: float | None = Field(None, description="the alignment's fit score (tasks/speech/verdict.py)")
    flags: list[str] = Field(default_factory=list, description="the row's warnings (what its checks flagged), then "
                             "the planner's (unsafe_cut, long_segment, approximate_cuts), each 'code: evidence'")

    @property
    def total_frames(self) -> int:
        return sum(s.frames for s in self.segments)

    @property
    def total_clips(self) -> int:
        return sum(s.clips for s in self.segments)


class Cue(Record):
    """One caption cue; times in seconds from the start of the row's audio."""

    start: float
    end: float
    text: str


class LoraRef(Record):
    """A LoRA file (local or s3://) and the strength it is applied with."""

    path: str
    strength: float = 1.0


class SegmentJob(Record):
    """Everything a generator needs to render one planned segment."""

    row_id: str
    segment: Segment
    image: str = Field(description="normalized reference image (local path)")
    audio: str = Field(description="16 kHz mono WAV holding exactly this segment's samples")
    prompt: str
    negative_prompt: str | None = None
    pose_video: str | None = None
    width: int
    height: int
    fps: int = FPS
    infer_frames: int = INFER_FRAMES
    resolution: Resolution = Resolution.P480
    steps: int = 40
    guidance: float = 4.5
    cues: list[Cue] = Field(default_factory=list, description="captions, times relative to the segment")
    preset: str = Field("exact", description="the speed preset the speed options come from")
    speed: dict | None = Field(None, description="speed options (model/presets.py SpeedConfig fields); None: exact")
    loras: list[LoraRef] = Field(default_factory=list, description="LoRAs applied to the DiT for this segment")
    mode: Mode | None = Field(None, description="'distilled': LiveAvatar's 4-step streaming generation (None: exact)")
    distilled_lora: str | None = Field(None, description="LiveAvatar's LoRA file (distilled mode; local or s3://)")
    precision: Precision = Field(DEFAULT_PRECISION, description="precision the worker's generator must run in")


class ClipResult(Record):
    index: int
    path: str = Field(description="video file of this clip (no audio)")
    frames: int
    state: str | None = Field(
        None, description="file with the lossless state to continue after this clip, while the segment is "
        "unfinished and this is its last finished clip (states are dropped as the segment goes on)"
    )
    reused: bool = Field(False, description="found finished on disk instead of generated")
    compute_s: float = Field(0.0, description="seconds the backend reported computing the clip (device-synchronised; "
                             "0 on CPU backends): part of the segment's gpu_s, not GPU seconds on its own")
    forwards: int = Field(0, description="DiT passes run for this clip (batch rows; 80 for 40 exact CFG steps)")
    timings: dict[str, float] = Field(
        default_factory=dict, description="for the model's clips: first_step_at (Unix time at the end of the "
        "first denoising step), first_step_s (clip start to that point: conditioning, and compilation on a fresh "
        "worker), step_s (median seconds of the later steps)"
    )


class SegmentResult(Record):
    segment_index: int
    backend: str
    clips: list[ClipResult]
    frames: int
    attempts: int = 1
    worker: str | None = None
    gpu_s: float = Field(0.0, description=GPU_SECONDS)
    compute_s: float = Field(0.0, description="sum of the clips' compute_s generated in the last attempt")
    forwards: int = 0

    @property
    def reused_clips(self) -> int:
        return sum(c.reused for c in self.clips)


RowStatus = Literal["succeeded", "failed", "skipped"]


class RowResult(Record):
    """One line of the report."""

    row: int
    id: str | None
    status: RowStatus
    error: str | None = None
    video: str | None = Field(None, description="relative to the output folder")
    captions: dict[str, str] = Field(default_factory=dict, description="format -> path relative to output")
    duration_s: float | None = None
    backend: str | None = None
    segments: int | None = None
    clips: int | None = None
    clips_reused: int | None = None
    attempts: int | None = None
    gpu_s: float | None = Field(None, description=GPU_SECONDS + "; summed over the row's segments")
    cost: float | None = Field(None, description="gpu_s at the configured price per GPU-hour")
    preset: str | None = None
    forwards: int | None = Field(None, description="DiT passes run for the row's new clips")
    workers: list[str] = Field(default_factory=list, description="GPU pool workers that rendered the segments")
    step_s: float | None = Field(None, description="median seconds per denoising step of the row's new clips")
    first_step_at: float | None = Field(
        None, description="Unix time at the end of the first denoising step of the row's new clips"
    )
    flags: list[str] = Field(default_factory=list)
    fit_score: float | None = Field(None, description="how well the audio says the script (the alignment's fit)")
    words_not_found: list[str] = Field(default_factory=list, description="script words the audio does not contain")
    cached: bool = Field(False, description="finished by an earlier run and skipped")
    audio_qc: AudioQC | None = None
    image_qc: ImageQC | None = None


class Report(Record):
    manifest: str
    output: str
    backend: str
    started_at: str
    finished_at: str
    rows: list[RowResult]
    manifest_errors: list[str] = Field(default_factory=list)
    gpu: str | None = Field(None, description="GPU kind the costs are for")
    price_per_gpu_hour: float | None = None
    gpu_s: float | None = Field(None, description=GPU_SECONDS + "; summed over the rows not cached")
    cost: float | None = Field(None, description="gpu_s at the price per GPU-hour")
    workers: list[dict] = Field(
        default_factory=list, description="the generators loaded for the batch: where, and how long loading took "
        "(load: seconds reading weights, building and moving them, per model.timing.LoadTimings)"
    )

    @property
    def counts(self) -> dict[str, int]:
        out = {"succeeded": 0, "failed": 0, "skipped": 0}
        for r in self.rows:
            out[r.status] += 1
        return out


BatchOutcome = Literal["succeeded", "partial", "failed"]


def batch_outcome(counts: dict[str, int], manifest_errors: int = 0) -> BatchOutcome:
    """How a batch that ran went; one meaning for its Prefect state, exit code, event and webhook
    (flows/states.py, tasks/notify.py): 'succeeded' when no row failed (some may be skipped), 'partial'
    when some rows failed and some succeeded, 'failed' when rows failed and none succeeded."""
    if not counts.get("failed") and not manifest_errors:
        return "succeeded"
    return "partial" if counts.get("succeeded") else "failed"


class RowFailure(Exception):
    """A row-level failure: the row fails, the batch goes on."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        self.where = f"column '{field}'"
        super().__init__(f"{self.where}: {reason}")
