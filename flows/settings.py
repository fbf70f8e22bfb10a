"""Batch settings: one typed object, read from S2V_* environment variables and the command line."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Backend = Literal["auto", "preview", "wan-s2v"]
LanguagePolicy = Literal["warn", "skip", "fail"]


class BatchSettings(BaseSettings):
    """Everything a batch run can be told; each field is also an `S2V_<NAME>` variable."""

    model_config = SettingsConfigDict(env_prefix="S2V_", extra="ignore")

    backend: Backend = Field(
        "auto", description="generator: 'preview' (CPU animatic), 'wan-s2v' (the model), 'auto' picks "
        "'wan-s2v' when a checkpoint is configured and 'preview' otherwise"
    )
    checkpoint: str | None = Field(None, description="Wan2.2-S2V-14B checkpoint folder or file (local or s3://)")
    device: str | None = Field(None, description="torch device for wan-s2v (default: cuda if available)")
    offload: bool = Field(False, description="offload idle model parts to CPU (24-48 GB GPUs)")
    allowed_roots: list[str] = Field(
        default_factory=list, description="folders/prefixes besides the manifest's own that rows may read from"
    )
    max_concurrent_rows: int = Field(2, ge=1, description="rows processed at the same time")
    work_dir: str | None = Field(
        None, description="local scratch for normalized assets and clips (default: OUT/.s2v/work, or the "
        "cache folder when OUT is remote)"
    )
    pad_s: float = Field(0.25, ge=0, description="silence kept before and after speech when trimming")
    max_audio_s: float = Field(1800.0, gt=0, description="longest audio accepted per row, seconds")
    language_policy: LanguagePolicy = Field("warn", description="what non-English speech does to a row")
    max_segment_s: float = Field(60.0, gt=0, description="longest independently generated segment, seconds")
    min_segment_s: float = Field(10.0, ge=0, description="shortest segment unless the audio is shorter")
    infer_frames: int = Field(80, ge=4, multiple_of=4, description="frames per clip")
    burn_captions: bool = Field(False, description="also burn captions into the video")
    force: bool = Field(False, description="redo rows that an earlier run finished")
