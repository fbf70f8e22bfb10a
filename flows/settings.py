"""Batch settings: one typed object, in one place.

Sources, each overriding the one before: the defaults below, a TOML config file
(`--config FILE`, else `S2V_CONFIG`, else `./s2v-batch.toml` when present), `S2V_<NAME>`
environment variables, then command-line options.
"""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tasks.records import DEFAULT_PRECISION, Mode, Precision

CONFIG_ENV = "S2V_CONFIG"
DEFAULT_CONFIG = Path("s2v-batch.toml")
_config_file: ContextVar[Path | None] = ContextVar("s2v_config_file", default=None)

Backend = Literal["auto", "preview", "wan-s2v"]
LanguagePolicy = Literal["warn", "skip", "fail"]
MismatchPolicy = Literal["warn", "skip", "fail"]
ImagePolicy = Literal["warn", "skip", "fail"]
PoolMode = Literal["auto", "on", "off"]
Preset = Literal["exact", "balanced", "fast"]
StepCache = Literal["none", "easycache", "magcache"]


class BatchSettings(BaseSettings):
    """Everything a batch run can be told; each field is also an `S2V_<NAME>` variable."""

    model_config = SettingsConfigDict(env_prefix="S2V_", extra="ignore")

    backend: Backend = Field(
        "auto", description="generator: 'preview' (CPU animatic), 'wan-s2v' (the model), 'auto' picks "
        "'wan-s2v' when a checkpoint is configured and 'preview' otherwise"
    )
    checkpoint: str | None = Field(None, description="Wan2.2-S2V-14B checkpoint folder or file (local or s3://)")
    device: str | None = Field(None, description="torch device for wan-s2v (default: cuda if available)")
    offload: bool = Field(
        False, description="keep the DiT's blocks in CPU memory and stream them to the GPU one by one, and the "
        "encoders and VAE on the CPU until they work (GPUs of 24 GB and up; as fast as without on an H100)"
    )
    precision: Precision = Field(
        DEFAULT_PRECISION, description="weights of the DiT's block linears for wan-s2v: 'bf16', or 'fp8' (GPUs with "
        "fp8: Hopper, Ada and later; refused elsewhere); a manifest row may name its own only if it is the batch's"
    )
    allowed_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="folders/prefixes besides the manifest's own that rows may read from "
        "(S2V_ALLOWED_ROOTS: a JSON list or comma-separated)"
    )
    max_concurrent_rows: int = Field(2, ge=1, description="rows processed at the same time")
    plan_processes: int | None = Field(
        None, ge=1, description="processes that normalize, align and plan rows at once in `plan`, each loading "
        "its own aligner (default: the CPU cores this process may use)"
    )
    work_dir: str | None = Field(
        None, description="local scratch for normalized assets and clips (default: OUT/.s2v/work, or the "
        "cache folder when OUT is remote)"
    )
    pad_s: float = Field(0.25, ge=0, description="silence kept before and after speech when trimming")
    max_audio_s: float = Field(1800.0, gt=0, description="longest audio accepted per row, seconds")
    language_policy: LanguagePolicy = Field("warn", description="what non-English speech does to a row")
    mismatch_policy: MismatchPolicy = Field(
        "skip", description="what audio that does not say the row's English script does to a row (a wrong "
        "file or wrong script; tasks/speech/language.py): 'skip' it before any GPU time (default), 'warn' and "
        "render it anyway, or 'fail' it"
    )
    image_policy: ImagePolicy = Field(
        "warn", description="what a reference image failing its checks (no face, face too small, blurry; "
        "tasks/normalize/image.py) does to a row: flag it ('warn'), skip it, or fail it"
    )
    alignment_model: str | None = Field(
        None, description="local Hugging Face Wav2Vec2ForCTC folder to align scripts with (tasks/speech/ctc.py); "
        "unset: the checkpoint's wav2vec2-large-xlsr-53-english folder for English rows when the checkpoint is "
        "a local folder holding it, else the offline aligner (pocketsphinx)"
    )
    whisper_model: str | None = Field(
        None, description="local faster-whisper (CTranslate2) model folder (tasks/speech/transcribe.py): detects each "
        "row's audio language for the language check and transcribes rows without a script; unset: no Whisper"
    )
    max_segment_s: float = Field(60.0, gt=0, description="longest independently generated segment, seconds")
    min_segment_s: float = Field(10.0, ge=0, description="shortest segment unless the audio is shorter")
    infer_frames: int = Field(80, ge=4, multiple_of=4, description="frames per clip")
    burn_captions: bool = Field(False, description="also burn captions into the video")
    force: bool = Field(False, description="redo rows that an earlier run finished")
    webhook_url: str | None = Field(None, description="URL told when the batch completes or fails (rows may "
                                    "name their own in a 'webhook' column)")
    webhook_secret: SecretStr | None = Field(None, description="shared secret signing webhook calls (HMAC-SHA256)")

    # Generation on a Ray pool of GPU workers (tasks/generate/pool.py).
    pool: PoolMode = Field(
        "auto", description="render segments on a Ray pool, one worker per GPU: 'on', 'off' (in the flow "
        "process), 'auto' (on for wan-s2v or when a Ray address is set)"
    )
    ray_address: str | None = Field(None, description="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")
    pool_workers: int | None = Field(
        None, ge=1, description="GPU workers (default: the cluster's GPUs / gpus_per_worker; a local Ray on a "
        "machine without GPUs declares this many times gpus_per_worker)"
    )
    gpus_per_worker: int = Field(
        1, ge=1, description="GPUs one pool worker takes (all on one node): 1 renders a segment per GPU (the most "
        "clips an hour over a batch); N > 1 splits each clip over N GPUs (sequence parallel, tasks/generate/"
        "group.py: one segment finishes sooner); must divide every node's GPUs, and the model's 40 heads must divide "
        "by N (by N/2 with parallel_cfg on an even N)"
    )
    parallel_cfg: bool = Field(
        True, description="in a worker of an even number of GPUs, run the two guidance branches on its two halves "
        "(each half sequence parallel); off: every GPU sequence parallel over the whole clip (better for presets "
        "that guide few steps)"
    )
    segment_attempts: int = Field(3, ge=1, description="attempts per segment on the pool, the first included")
    retry_backoff_s: float = Field(5.0, ge=0, description="wait before a segment's 2nd attempt; doubles after")
    offload_on_oom: bool = Field(True, description="retry a segment that ran out of GPU memory with offloading")
    clip_store: str | None = Field(
        None, description="s3:// prefix or shared folder mirroring every clip, for pool workers on other nodes"
    )
    generator_factory: str | None = Field(
        None, description="'module:callable' building a custom generator, used instead of the named backend"
    )
    generator_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for generator_factory (JSON in the variable)"
    )

    mode: Mode = Field(
        "exact", description="'exact' (the released sampler) or 'distilled': LiveAvatar's 4-step streaming "
        "generation, no CFG, 48-frame clips, with its LoRA (distilled_lora); a 'mode' column overrides per row"
    )
    distilled_lora: str | None = Field(
        None, description="LiveAvatar's LoRA for distilled mode: liveavatar.safetensors (local or s3://)"
    )

    # Speed, LoRAs and cost (model/presets.py, model/speed.py, model/lora.py, tasks/cost.py). Each part
    # of a preset is a setting of its own; unset (None), the row's preset decides.
    preset: Preset = Field(
        "exact", description="speed preset for every row (a 'preset' column overrides per row): 'exact' (the "
        "reference's sampling, the default), 'balanced', 'fast'; judge them on your weights with `calibrate`"
    )
    sample_steps: int | None = Field(
        None, ge=1, description="denoising steps at most (default: the preset's: exact keeps each row's steps, "
        "balanced 30, fast 14; a row asking for fewer keeps its own)"
    )
    sample_shift: float | None = Field(None, gt=0, description="noise-schedule shift (default: the resolution's)")
    cfg_steps: int | None = Field(
        None, ge=0, description="classifier-free guidance only on the first N steps (default: the preset's: "
        "exact every step, balanced 6, fast 3)"
    )
    cfg_every: int | None = Field(
        None, ge=0, description="after those, guidance also on every k-th step (default: the preset's, 0: never)"
    )
    step_cache: StepCache | None = Field(
        None, description="reuse the DiT's output on steps where it is predicted to change little: 'easycache' "
        "(no calibration), 'magcache' (ratios from `calibrate`), 'none' (default: the preset's: exact none, "
        "balanced and fast easycache)"
    )
    cache_threshold: float | None = Field(None, ge=0, description="step cache: error allowed before a step runs "
                                          "again (default: the preset's, 0.05 balanced, 0.1 fast)")
    cache_warmup: float | None = Field(None, ge=0, le=1, description="step cache: share of the first steps that "
                                       "always run (default 0.2)")
    cache_max_skips: int | None = Field(None, ge=0, description="step cache: steps reused in a row at most "
                                        "(default: the preset's)")
    calibration: str | None = Field(
        None, description="JSON written by `s2v-batch calibrate`: MagCache's ratios, and the DiT passes each "
        "preset ran on your weights (the plan's estimates use them)"
    )
    lora: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="LoRA files for the DiT, every row (local or s3://; kohya, ComfyUI, "
        "PEFT/diffusers or DiffSynth keys); a 'lora' column overrides per row"
    )
    lora_strength: Annotated[list[float], NoDecode] = Field(
        default_factory=list, description="one strength for all LoRAs or one per LoRA (default 1.0)"
    )
    gpu_kind: str = Field(
        "H100", description="GPU the plan's and report's GPU-hours are for (tasks/cost.py GPU_KINDS: H100, H200, "
        "H100 PCIe, A100, L40S, RTX 6000 Ada, RTX 4090)"
    )
    gpu_price_per_hour: float | None = Field(
        None, ge=0, description="price of one GPU-hour (your currency): the plan and report then show costs"
    )

    @field_validator("allowed_roots", "lora", "lora_strength", mode="before")
    @classmethod
    def _list_from_text(cls, value: Any) -> Any:
        """A list from the environment: a JSON list, else comma-separated (`S2V_ALLOWED_ROOTS=/a,s3://b/c`)."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list: {exc}") from None
        return [part.strip() for part in text.split(",") if part.strip()]

    @model_validator(mode="after")
    def _consistent(self) -> BatchSettings:
        # Checked once at load, not per row after its audio was normalized (tasks/plan.py needs it).
        if self.min_segment_s > self.max_segment_s / 2:
            raise ValueError(
                f"min_segment_s {self.min_segment_s:g} must be at most half of max_segment_s {self.max_segment_s:g} "
                "(a long take is cut into segments no shorter than the minimum)"
            )
        if self.mode == "distilled" and self.gpus_per_worker > 1:
            raise ValueError(
                f"mode 'distilled' runs on one GPU per worker: its streaming KV caches (model/causal.py) are not "
                f"split over GPUs; set gpus_per_worker=1 (got {self.gpus_per_worker})"
            )
        return self

    @field_validator("gpu_kind")
    @classmethod
    def _known_gpu(cls, value: str) -> str:
        from tasks.cost import GPU_KINDS, gpu_kind

        kind = gpu_kind(value)
        if kind is None:
            raise ValueError(f"unknown GPU kind {value!r}; one of {', '.join(GPU_KINDS)}")
        return kind.name

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = config_file()
        if config is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config))
        return tuple(sources)


class SettingsError(Exception):
    """Settings cannot be loaded; the message names the setting or file to fix."""


def config_file() -> Path | None:
    """The config file in effect: --config, else S2V_CONFIG, else ./s2v-batch.toml if it exists."""
    chosen = _config_file.get() or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if chosen is not None:
        return chosen
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(config: str | Path | None = None, **overrides: Any) -> BatchSettings:
    """Build the settings from every source; `overrides` (command-line options) win, None means unset."""
    token = _config_file.set(Path(config) if config else None)
    try:
        path = config_file()
        if path is not None and not path.is_file():
            origin = "--config" if config else CONFIG_ENV
            raise SettingsError(f"config file {path} does not exist (set by {origin})")
        try:
            return BatchSettings(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            where = f" (config file {path})" if path else ""
            raise SettingsError(f"invalid settings{where}: {one_line(exc)}") from None
        except Exception as exc:  # e.g. a TOML syntax error or a variable that is not JSON
            where = f" (config file {path})" if path else ""
            raise SettingsError(f"invalid settings{where}: {type(exc).__name__}: {exc}") from None
    finally:
        _config_file.reset(token)


def one_line(exc: ValidationError) -> str:
    """Pydantic's errors on one line, each naming the setting, the problem and the value given."""
    parts = []
    for error in exc.errors(include_url=False):
        name = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        given = "" if not name or isinstance(error.get("input"), dict) else f" (got {error.get('input')!r})"
        parts.append(f"{name}: {message}{given}" if name else message)
    return "; ".join(parts)
