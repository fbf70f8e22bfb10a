"""Where a batch keeps its files, and the markers that let a rerun skip finished rows.

Output folder (local or s3://):
    OUT/<row output>.mp4, .srt, .vtt     the deliverables
    OUT/report.json                      the batch report
    OUT/.s2v/rows/<id>.json              done marker: the row's fingerprint and result
    OUT/.s2v/manifests/                  the pickup flow's registry of manifests run
Work folder (always local):
    WORK/<id>/audio_16k.wav, master.wav, image.png   normalized inputs (named by tasks/normalize)
                                                     (the aligner spools a long row's PCM beside
                                                     audio_16k.wav in a file with no name)
    WORK/<id>/assets.json, speech.json, plan.json    the steps' records
    WORK/<id>/seg_000/audio.wav                      the segment's audio
    WORK/<id>/seg_000/clip_0000.mp4 (+ .state.npz)   its clips (named by tasks/generate/stage.py)
    WORK/<id>/captions.srt, .vtt, video.mp4          stitched before publishing
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tasks import storage
from tasks.records import ManifestRow, NormalizedAssets, RowResult

STATE_DIR = ".s2v"
"""The batch's own records inside the output folder (markers, the lock, the work folder); no row writes there."""
FINGERPRINT_VERSION = "1"
"""Bump when a change to the pipeline makes earlier outputs stale."""


def default_work_dir(out: str) -> Path:
    if storage.is_remote(out):
        key = hashlib.sha256(out.encode()).hexdigest()[:16]
        return storage.DEFAULT_CACHE / "work" / key
    return Path(out).resolve() / STATE_DIR / "work"


def plan_work_dir(manifest: str) -> Path:
    """Work folder of `s2v-batch plan` without a configured one: a cache folder keyed by the manifest,
    so planning twice normalizes and aligns each row once."""
    return storage.DEFAULT_CACHE / "plan" / hashlib.sha256(manifest.encode()).hexdigest()[:16]


def report_uri(out: str) -> str:
    return storage.join(out, "report.json")


def registry_uri(out: str) -> str:
    return storage.join(out, STATE_DIR, "manifests")


@dataclass(frozen=True)
class RowPaths:
    """Files of one row in the local work folder."""

    root: Path

    @classmethod
    def for_row(cls, work_dir: Path, row_id: str) -> RowPaths:
        return cls(Path(work_dir) / row_id)

    @classmethod
    def for_assets(cls, assets: NormalizedAssets) -> RowPaths:
        """The row folder the normalized assets were written to."""
        return cls(Path(assets.audio_16k).parent)

    @property
    def assets_json(self) -> Path:
        return self.root / "assets.json"

    @property
    def speech_json(self) -> Path:
        return self.root / "speech.json"

    @property
    def plan_json(self) -> Path:
        return self.root / "plan.json"

    def segment_dir(self, index: int) -> Path:
        return self.root / f"seg_{index:03d}"

    def segment_audio(self, index: int) -> Path:
        return self.segment_dir(index) / "audio.wav"

    def clips(self, index: int) -> list[Path]:
        """The clip files of segment `index` present on disk (see tasks/generate/stage.clip_path)."""
        return sorted(self.segment_dir(index).glob("clip_*.mp4"))

    @property
    def video(self) -> Path:
        return self.root / "video.mp4"

    @property
    def captions_stem(self) -> Path:
        return self.root / "captions"


def output_uris(out: str, row: ManifestRow) -> dict[str, str]:
    """Final locations of a row's deliverables."""
    video = storage.join(out, row.output)
    stem = video[: -len(".mp4")]
    return {"video": video, "srt": stem + ".srt", "vtt": stem + ".vtt"}


def _file_identity(uri: str) -> str:
    """Cheap identity of an input file: size and modification time (ETag for objects). A file that
    cannot be reached has no identity: the fingerprint then never matches a finished row, and the
    row's fetch names the cause (tasks/steps.fetch_input)."""
    try:
        return _stat_identity(uri)
    except Exception as exc:  # noqa: BLE001 - any client or OS error: see the docstring
        return f"unreachable:{type(exc).__name__}"


def _stat_identity(uri: str) -> str:
    if storage.is_remote(uri):
        fs, path = storage.filesystem(uri)
        info = fs.info(path)
        return f"{info.get('size')}:{info.get('ETag') or info.get('etag') or info.get('LastModified')}"
    stat = os.stat(uri)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def row_fingerprint(row: ManifestRow, settings: dict) -> str:
    """Hash of everything that determines a row's outputs; a change anywhere redoes the row."""
    inputs = {c: _file_identity(getattr(row, c)) for c in ("audio", "image", "pose_video") if getattr(row, c)}
    # the speed and LoRA columns count only when given: rows finished before they existed keep their markers
    fields = row.model_dump(mode="json", exclude={"row"})
    fields = {k: v for k, v in fields.items() if not (k in ("preset", "lora", "lora_strength") and v is None)}
    payload = {
        "version": FINGERPRINT_VERSION,
        "row": fields,
        "inputs": inputs,
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def marker_uri(out: str, row_id: str) -> str:
    return storage.join(out, STATE_DIR, "rows", f"{row_id}.json")


def load_finished(out: str, row: ManifestRow, fingerprint: str) -> RowResult | None:
    """The earlier result of this row if it finished with the same fingerprint and its video is there."""
    uri = marker_uri(out, row.id)
    try:
        marker = json.loads(storage.read_text(uri))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if marker.get("fingerprint") != fingerprint:
        return None
    result = RowResult.model_validate(marker["result"])
    if result.status != "succeeded" or not storage.exists(output_uris(out, row)["video"]):
        return None
    return result.model_copy(update={"row": row.row, "cached": True})


def mark_finished(out: str, row: ManifestRow, fingerprint: str, result: RowResult) -> None:
    marker = {"fingerprint": fingerprint, "result": result.model_dump(mode="json")}
    storage.write_text(marker_uri(out, row.id), json.dumps(marker, indent=2))
