"""The Wan2.2-S2V-14B checkpoint on disk: every file name of the official layout
(`Wan-AI/Wan2.2-S2V-14B`, EXPECTED_LAYOUT) and of ComfyUI's single files, the checks that name
every missing or unreadable file, and which file provides which component (`resolve` ->
`CheckpointFiles`, the paths the loaders take). The component modules know no file names.

A checkpoint is one path or several (each a folder or a file); every component comes from the
first that provides it. A folder may be the official one, a flat folder of ComfyUI files, or a
ComfyUI `models/` tree (or the ComfyUI folder above it): ComfyUI files are found in the folder and
in its `diffusion_models/` (`unet/`), `text_encoders/` (`clip/`), `vae/` and `audio_encoders/`
folders, and recognised by their keys (model.comfy.identify), so renamed files work and a file of
another model is named with what it is. What ComfyUI files lack comes from an official folder
beside them, or is implied: the umT5 tokenizer is embedded in ComfyUI's umT5 file (`spiece_model`),
wav2vec2's configuration follows from its shapes, and its preprocessing is the standard one.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from safetensors import SafetensorError

from model import comfy

DIT_STEM = "diffusion_pytorch_model"
DIT_CONFIG = "config.json"
DIT_SINGLE = f"{DIT_STEM}.safetensors"
DIT_INDEX = f"{DIT_SINGLE}.index.json"
T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"
VAE_CHECKPOINT = "Wan2.1_VAE.pth"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"
WAV2VEC_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# ComfyUI's files (its Wan2.2-S2V guide; umt5_xxl_fp16 is the unquantized text encoder it also offers)
COMFY_DIT_BF16 = "wan2.2_s2v_14B_bf16.safetensors"
COMFY_DIT_FP8 = "wan2.2_s2v_14B_fp8_scaled.safetensors"
COMFY_T5_FP8 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
COMFY_T5_FP16 = "umt5_xxl_fp16.safetensors"
COMFY_VAE_CHECKPOINT = "wan_2.1_vae.safetensors"
COMFY_WAV2VEC = "wav2vec2_large_english_fp16.safetensors"
COMFY_FILES = (COMFY_DIT_BF16, COMFY_DIT_FP8, COMFY_T5_FP8, COMFY_T5_FP16, COMFY_VAE_CHECKPOINT, COMFY_WAV2VEC)
# ComfyUI's model folders per component (older installs name the first two unet/ and clip/)
COMFY_DIRS = {"dit": ("diffusion_models", "unet"), "text_encoder": ("text_encoders", "clip"),
              "vae": ("vae",), "audio_encoder": ("audio_encoders",)}  # fmt: skip
_COMFY_SUBDIRS = tuple(d for dirs in COMFY_DIRS.values() for d in dirs)
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
  {WAV2VEC_DIR}/ (config.json, preprocessor_config.json, model.safetensors or pytorch_model.bin)
or ComfyUI's files (a flat folder or its models/ tree): {COMFY_DIT_BF16} (or {COMFY_DIT_FP8}),
  {COMFY_T5_FP8}, {COMFY_VAE_CHECKPOINT}, {COMFY_WAV2VEC}"""
# the files beside the DiT's, each a group of which any one will do
_ENCODER_FILES = ((T5_CHECKPOINT,), (f"{T5_TOKENIZER}/tokenizer.json", f"{T5_TOKENIZER}/spiece.model"),
                  (VAE_CHECKPOINT, COMFY_VAE_CHECKPOINT), (f"{WAV2VEC_DIR}/config.json",),
                  (f"{WAV2VEC_DIR}/preprocessor_config.json",),
                  tuple(f"{WAV2VEC_DIR}/{name}" for name in WAV2VEC_WEIGHTS))  # fmt: skip
COMFY_LAYOUT = f"a ComfyUI single file such as {COMFY_DIT_BF16} or {COMFY_DIT_FP8}"
# what to fetch for each component, for messages
_WANTED = {
    "dit": f"the DiT: an official folder ({DIT_CONFIG} + {DIT_STEM} shards) or {COMFY_DIT_BF16} / "
    f"{COMFY_DIT_FP8} (ComfyUI models/diffusion_models)",
    "text_encoder": f"the umT5 text encoder: {T5_CHECKPOINT} or {COMFY_T5_FP8} (ComfyUI models/text_encoders)",
    "tokenizer": f"the umT5 tokenizer: {T5_TOKENIZER}/ (tokenizer.json or spiece.model) from the official folder",
    "vae": f"the VAE: {VAE_CHECKPOINT} or {COMFY_VAE_CHECKPOINT} (ComfyUI models/vae)",
    "audio_encoder": f"the audio encoder: {WAV2VEC_DIR}/ or {COMFY_WAV2VEC} (ComfyUI models/audio_encoders)",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class CheckpointFiles:
    """Which file (or folder) provides each component: what the loaders are given."""

    dit: Path  # an official DiT folder, or a single .safetensors file (model.checkpoint.load_transformer)
    text_encoder: Path  # umT5 encoder: Wan's .pth, or ComfyUI's .safetensors (transformers' names)
    tokenizer: Path  # umT5 tokenizer folder, or the ComfyUI umT5 file that embeds it (`spiece_model`)
    vae: Path  # Wan2.1 VAE, .pth or ComfyUI .safetensors
    audio_encoder: Path  # wav2vec2 folder (transformers layout) or ComfyUI .safetensors
    audio_config: Path | None = None  # for a single-file audio encoder: a folder with its config.json /
    # preprocessor_config.json (None: configuration from the shapes, standard preprocessing)
    dit_fp8: bool = False  # the DiT file stores scaled-fp8 weights

    def describe(self) -> str:
        """The files by name (no folders), e.g. for a fingerprint of what was loaded."""
        dit = "official" if self.dit.is_dir() else self.dit.name
        return f"dit={dit} t5={self.text_encoder.name} vae={self.vae.name} audio={self.audio_encoder.name}"


def resolve(checkpoint: str | Path | Sequence[str | Path], precision: str | None = None) -> CheckpointFiles:
    """The file of each component, taken from the first path in `checkpoint` that provides it
    (see the module doc). Every chosen file is checked to be complete (headers only, nothing large
    is read). The DiT: with precision "fp8" a scaled-fp8 file is preferred, otherwise a bf16 one.

    Raises CheckpointError naming every missing component with where it may come from, every
    file found of another model (with what it is), and any truncated or unreadable file."""
    paths = [Path(p) for p in ([checkpoint] if isinstance(checkpoint, (str, Path)) else checkpoint)]
    if not paths:
        raise CheckpointError(f"no checkpoint given; {EXPECTED_LAYOUT}")
    for path in paths:
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist; {EXPECTED_LAYOUT}")
    sources = [_Source.scan(p) for p in paths]
    files, missing = _choose(sources, precision)
    if missing:
        only = sources[0]
        if len(sources) == 1 and only.folder is not None and not any(
            i.fits and i.component != "vae" for i in only.comfy.values()
        ):
            check_layout(only.folder)  # an official folder: the message naming every file it lacks
        where = ", ".join(str(s.folder or next(iter(s.comfy))) for s in sources)
        lacking = {component for component, _ in missing}
        others = [  # files of the kinds that are missing, and files given by name, that do not fit
            f"{p.name} is {i.what}"
            for s in sources
            for p, i in s.comfy.items()
            if not i.fits and (i.component in lacking or s.folder is None)
        ]
        found = f" (found: {'; '.join(others)})" if others else ""
        raise CheckpointError(f"checkpoint {where} lacks {'; '.join(text for _, text in missing)}{found}")
    return _checked(files)


@dataclass
class _Source:
    """What one given path offers: an official folder's parts and the ComfyUI files found."""

    folder: Path | None  # the folder the official parts are looked up in (None for a lone file)
    comfy: dict[Path, comfy.Identity]  # every .safetensors found, identified

    @classmethod
    def scan(cls, path: Path) -> _Source:
        if path.is_file():
            if path.name.startswith(DIT_STEM) or path.name == DIT_CONFIG:
                return cls(path.parent, {})  # a file of an official folder stands for the folder
            if path.suffix != ".safetensors":
                raise CheckpointError(f"{path}: not a .safetensors file; {EXPECTED_LAYOUT}")
            return cls(None, {path: _identify(path)})
        found = {}
        for where in (path, *(path / d for d in _COMFY_SUBDIRS), *(path / "models" / d for d in _COMFY_SUBDIRS)):
            for file in sorted(where.glob("*.safetensors")) if where.is_dir() else ():
                if not file.name.startswith(DIT_STEM):
                    found[file] = _identify(file)
        return cls(path, found)

    def fitting(self, component: str) -> list[tuple[Path, comfy.Identity]]:
        return [(p, i) for p, i in self.comfy.items() if i.component == component and i.fits]


def _identify(path: Path) -> comfy.Identity:
    try:
        return comfy.identify(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {exc}; "
                              "download it again") from exc  # fmt: skip


def _choose(
    sources: list[_Source], precision: str | None
) -> tuple[CheckpointFiles | None, list[tuple[str, str]]]:
    """Each component from the first source that has it (the DiT: by precision, then source);
    or None and what is missing: (component, what it is and where it may come from)."""
    missing: list[tuple[str, str]] = []
    official = [s.folder for s in sources if s.folder is not None]

    dits: list[tuple[int, int, Path, bool]] = []  # (preference, source, path, fp8)
    for n, folder in ((n, s.folder) for n, s in enumerate(sources) if s.folder is not None):
        if (folder / DIT_CONFIG).is_file() or any(folder.glob(f"{DIT_STEM}*.safetensors*")):
            if lacking := dit_missing(folder):  # an official DiT partly there is a broken download
                missing.append(("dit", f"{', '.join(lacking)} in {folder}"))
            else:
                dits.append((int(precision == "fp8"), n, folder, False))
    for n, source in enumerate(sources):
        for path, ident in source.fitting("dit"):  # the precision asked for first, then the source order
            dits.append((int(ident.fp8 != (precision == "fp8")), n, path, ident.fp8))
    dits.sort(key=lambda d: d[:2])
    if not dits and not missing:
        missing.append(("dit", _WANTED["dit"]))

    def first(component: str, official_path: str, complete=Path.is_file) -> Path | None:
        for source in sources:
            if source.folder is not None and complete(source.folder / official_path):
                return source.folder / official_path
            if fits := source.fitting(component):
                return min(fits, key=lambda f: (f[0].name not in COMFY_FILES, f[0].name))[0]
        missing.append((component, _WANTED[component]))
        return None

    text_encoder = first("text_encoder", T5_CHECKPOINT)
    vae = first("vae", VAE_CHECKPOINT)
    audio_encoder = first("audio_encoder", WAV2VEC_DIR, _complete_wav2vec)
    tokenizer = next((f / T5_TOKENIZER for f in official if _has_tokenizer(f / T5_TOKENIZER)), None)
    if tokenizer is None:  # the tokenizer embedded in a ComfyUI umT5 file (the chosen one first)
        embedding = sorted((p for s in sources for p, i in s.fitting("text_encoder") if i.tokenizer),
                           key=lambda p: p != text_encoder)  # fmt: skip
        tokenizer = embedding[0] if embedding else None
        if tokenizer is None and text_encoder is not None:
            embeds = f"; {text_encoder.name} embeds none" if text_encoder.suffix == ".safetensors" else ""
            missing.append(("tokenizer", _WANTED["tokenizer"] + embeds))
    audio_config = next((f / WAV2VEC_DIR for f in official if (f / WAV2VEC_DIR / "config.json").is_file()), None)
    if missing:
        return None, missing
    _, _, dit, dit_fp8 = dits[0]
    files = CheckpointFiles(
        dit=dit, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, audio_encoder=audio_encoder,
        audio_config=audio_config if audio_encoder.is_file() else audio_encoder, dit_fp8=dit_fp8,
    )  # fmt: skip
    return files, []


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()


def _complete_wav2vec(folder: Path) -> bool:
    names = ("config.json", "preprocessor_config.json")
    return all((folder / n).is_file() for n in names) and any((folder / w).is_file() for w in WAV2VEC_WEIGHTS)


def _checked(files: CheckpointFiles) -> CheckpointFiles:
    """CheckpointError naming the first file that is truncated or unreadable (headers only)."""
    paths = [files.text_encoder, files.vae, files.tokenizer]
    if files.dit.is_dir():
        index = files.dit / DIT_INDEX
        shards = sorted(set(read_index(files.dit).values())) if index.is_file() else [DIT_SINGLE]
        paths += [files.dit / s for s in shards]
    else:
        paths.append(files.dit)
    if files.audio_encoder.is_dir():
        paths += [files.audio_encoder / w for w in WAV2VEC_WEIGHTS if (files.audio_encoder / w).is_file()][:1]
    else:
        paths.append(files.audio_encoder)
    for path in paths:
        check_complete(path)
    return files


def mirrored(rel: str) -> bool:
    """Whether a mirror of a remote checkpoint folder copies the file at `rel` (a path inside it):
    the official layout's files, and ComfyUI's files by name, flat or in ComfyUI's model folders
    (other files of a ComfyUI tree are not copied: renamed files are found only locally)."""
    if rel.startswith(OFFICIAL_PATHS):
        return True
    folder, _, name = rel.rpartition("/")
    return name in COMFY_FILES and folder.removeprefix("models/").removeprefix("models") in ("", *_COMFY_SUBDIRS)


def check_complete(path: Path) -> None:
    """A .safetensors file must hold every byte its header promises (safetensors checks this when
    it opens the file); a .pth / .bin (torch's zip format) must end in its zip directory, which a
    truncated download lacks. Folders pass. Nothing but headers is read."""
    if path.is_dir():
        return
    try:
        if path.suffix == ".safetensors":
            comfy.header(path)
        elif path.suffix in (".pth", ".bin", ".pt"):
            with zipfile.ZipFile(path):
                pass
    except (SafetensorError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt file ({exc}); download it again") from exc


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
