"""The Wan2.2-S2V-14B checkpoint on disk: every file name of the official layout
(`Wan-AI/Wan2.2-S2V-14B`, EXPECTED_LAYOUT), the checks that name every missing file, and which
file provides which component (`resolve` -> `CheckpointFiles`, the paths the loaders take). The
component modules know no file names; a source other than one official folder (ComfyUI single
files, alone or beside a folder for what they lack) is a matter of resolving here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DIT_STEM = "diffusion_pytorch_model"
DIT_CONFIG = "config.json"
DIT_SINGLE = f"{DIT_STEM}.safetensors"
DIT_INDEX = f"{DIT_SINGLE}.index.json"
T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"
VAE_CHECKPOINT = "Wan2.1_VAE.pth"
COMFY_VAE_CHECKPOINT = "wan_2.1_vae.safetensors"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"
# every file of the official layout, as prefixes of paths inside the folder (what a mirror copies)
OFFICIAL_PATHS = (DIT_CONFIG, DIT_INDEX, DIT_SINGLE, f"{DIT_STEM}-", T5_CHECKPOINT, f"{T5_TOKENIZER}/",
                  VAE_CHECKPOINT, COMFY_VAE_CHECKPOINT, f"{WAV2VEC_DIR}/")  # fmt: skip

EXPECTED_LAYOUT = f"""expected the official layout of Wan2.2-S2V-14B:
  {DIT_CONFIG}
  {DIT_INDEX} + the {DIT_STEM}-0000K-of-0000N.safetensors shards it names
    (or one {DIT_SINGLE})
  {T5_CHECKPOINT}
  {T5_TOKENIZER}/ (tokenizer.json or spiece.model, tokenizer_config.json)
  {VAE_CHECKPOINT} (or ComfyUI's {COMFY_VAE_CHECKPOINT})
  {WAV2VEC_DIR}/ (config.json, preprocessor_config.json, model.safetensors or pytorch_model.bin)"""
# the files beside the DiT's, each a group of which any one will do
_ENCODER_FILES = ((T5_CHECKPOINT,), (f"{T5_TOKENIZER}/tokenizer.json", f"{T5_TOKENIZER}/spiece.model"),
                  (VAE_CHECKPOINT, COMFY_VAE_CHECKPOINT), (f"{WAV2VEC_DIR}/config.json",),
                  (f"{WAV2VEC_DIR}/preprocessor_config.json",),
                  (f"{WAV2VEC_DIR}/model.safetensors", f"{WAV2VEC_DIR}/pytorch_model.bin"))  # fmt: skip
COMFY_LAYOUT = "a ComfyUI single file such as wan2.2_s2v_14B_bf16.safetensors or wan2.2_s2v_14B_fp8_scaled.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class CheckpointFiles:
    """Which file (or folder) provides each component: what the loaders are given."""

    dit: Path  # an official DiT folder, or a ComfyUI single file (model.checkpoint.load_transformer)
    text_encoder: Path  # umT5 encoder weights in Wan's naming
    tokenizer: Path  # umT5 tokenizer folder
    vae: Path  # Wan2.1 VAE, .pth or ComfyUI .safetensors
    audio_encoder: Path  # wav2vec2 folder (transformers layout)


def resolve(folder: str | Path) -> CheckpointFiles:
    """The component files of an official checkpoint folder; CheckpointError naming every missing one."""
    folder = check_layout(folder)
    vae = folder / VAE_CHECKPOINT
    return CheckpointFiles(
        dit=folder,
        text_encoder=folder / T5_CHECKPOINT,
        tokenizer=folder / T5_TOKENIZER,
        vae=vae if vae.is_file() else folder / COMFY_VAE_CHECKPOINT,
        audio_encoder=folder / WAV2VEC_DIR,
    )


def check_layout(folder: str | Path) -> Path:
    """Raise CheckpointError naming every missing file and the expected layout; return the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; {EXPECTED_LAYOUT}")
    missing = missing_files(folder)
    if missing:
        raise CheckpointError(f"checkpoint folder {folder} is missing: {', '.join(missing)}; {EXPECTED_LAYOUT}")
    return folder


def missing_files(folder: str | Path) -> list[str]:
    """Every file of the official layout that `folder` lacks (empty when complete)."""
    folder = Path(folder)
    return dit_missing(folder) + [
        names[0] + "".join(f" (or {Path(n).name})" for n in names[1:])
        for names in _ENCODER_FILES
        if not any((folder / n).is_file() for n in names)
    ]


def dit_missing(folder: Path) -> list[str]:
    """The DiT files of the official layout that `folder` lacks, each saying why it is expected."""
    missing = [] if (folder / DIT_CONFIG).is_file() else [DIT_CONFIG]
    if (folder / DIT_INDEX).is_file():
        shards = sorted(set(read_index(folder).values()))
        return missing + [f"{s} (named in {DIT_INDEX})" for s in shards if not (folder / s).is_file()]
    if not (folder / DIT_SINGLE).is_file():
        shards = sorted(p.name for p in folder.glob(f"{DIT_STEM}-*.safetensors"))
        found = f"found shards {', '.join(shards)} but no index naming them" if shards else f"or {DIT_SINGLE}"
        missing.append(f"{DIT_INDEX} ({found})")
    return missing


def read_index(folder: Path) -> dict[str, str]:
    """The index's weight map {tensor name: shard file}."""
    path = folder / DIT_INDEX
    try:
        return dict(json.loads(path.read_text(encoding="utf-8"))["weight_map"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors index (needs a 'weight_map'): {exc}") from exc


def detect_layout(path: str | Path) -> Literal["official", "comfyui"]:
    """'official' for a folder (or a file inside one) with the official DiT files, 'comfyui' for
    a single .safetensors file (or a folder holding just one .safetensors that is not official).
    Raises CheckpointError when it is neither."""
    path = Path(path)
    expected = f"{EXPECTED_LAYOUT}\n(or, for the DiT alone, {COMFY_LAYOUT})"
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; {expected}")
    if not path.is_dir():
        if path.name.startswith(DIT_STEM) or path.name == DIT_CONFIG:
            return "official"
        if path.suffix == ".safetensors":
            return "comfyui"
        raise CheckpointError(f"{path}: not a .safetensors file; {expected}")
    names = sorted(p.name for p in path.iterdir())
    if DIT_CONFIG in names or any(n.startswith(DIT_STEM) for n in names):
        return "official"
    single = [n for n in names if n.endswith(".safetensors")]
    if len(single) == 1:
        return "comfyui"
    several = " (several .safetensors files: pass the one to load)" if single else ""
    raise CheckpointError(f"{path}: found {names or 'nothing'}{several}; {expected}")
