"""Normalization stage: one manifest row's audio, image and script made ready for every later stage.

Audio and image work live in `audio.py` and `image.py`; this module is the stage's entry point
(`normalize_row`) and holds the script clean-up.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from tasks.normalize.audio import normalize_audio
from tasks.normalize.image import normalize_image, size_bucket
from tasks.records import ManifestRow, NormalizedAssets, Resolution, RowFailure

__all__ = ["normalize_audio", "normalize_image", "normalize_row", "normalize_script", "size_bucket"]

# Typographic punctuation that NFKC leaves alone, mapped to the ASCII a caption font and an
# aligner's tokenizer both handle. Em dashes become spaced hyphens so the words either side stay
# separate words.
_PUNCTUATION = str.maketrans(
    {
        "\u2018": "'",  # left single quote
        "\u2019": "'",  # right single quote / apostrophe
        "\u201a": "'",  # single low-9 quote
        "\u201b": "'",  # single high-reversed-9 quote
        "\u2032": "'",  # prime
        "\u00b4": "'",  # acute accent used as an apostrophe
        "\u201c": '"',  # left double quote
        "\u201d": '"',  # right double quote
        "\u201e": '"',  # double low-9 quote
        "\u201f": '"',  # double high-reversed-9 quote
        "\u2033": '"',  # double prime
        "\u00ab": '"',  # guillemets
        "\u00bb": '"',
        "\u2039": "'",
        "\u203a": "'",
        "\u2010": "-",  # hyphen
        "\u2011": "-",  # non-breaking hyphen
        "\u2012": "-",  # figure dash
        "\u2013": "-",  # en dash (ranges: 1990-2000)
        "\u2212": "-",  # minus sign
        "\u2014": " - ",  # em dash
        "\u2015": " - ",  # horizontal bar
        "\u00ad": "",  # soft hyphen
        "\u200b": "",  # zero-width space
        "\u200c": "",  # zero-width non-joiner
        "\u200d": "",  # zero-width joiner
        "\u2060": "",  # word joiner
        "\ufeff": "",  # byte-order mark
    }
)
_WHITESPACE = re.compile(r"\s+")


def normalize_script(text: str | None) -> str | None:
    """NFKC, ASCII quotes and dashes, control characters dropped, whitespace collapsed.

    Words, case and punctuation are kept. Returns None for a missing or blank script.
    """
    if text is None:
        return None
    text = unicodedata.normalize("NFKC", text).translate(_PUNCTUATION)
    # Control characters (other than whitespace) carry no words and break caption files.
    text = "".join(ch if ch.isspace() or unicodedata.category(ch)[0] != "C" else " " for ch in text)
    text = _WHITESPACE.sub(" ", text).strip()
    return text or None


def normalize_row(
    row: ManifestRow,
    work_dir: Path,
    *,
    audio_path: Path,
    image_path: Path,
    pad_s: float = 0.25,
    max_duration_s: float = 1800,
    silence_threshold_db: float = -50,
) -> NormalizedAssets:
    """Normalize one row's assets into `work_dir` (the row's folder).

    `audio_path` and `image_path` are local copies of `row.audio` and `row.image`. Writes
    `audio_16k.wav`, `master.wav` and `image.png`; raises RowFailure naming the field on bad input.
    The image is checked first: it is cheap, and a bad image should not cost an audio decode.
    """
    work_dir = Path(work_dir)
    try:
        resolution = Resolution(row.resolution)
    except ValueError as exc:
        raise RowFailure("resolution", f"unknown resolution {row.resolution!r} (use 480p or 720p)") from exc
    image, width, height, image_qc = normalize_image(Path(image_path), work_dir, resolution)
    audio_16k, master, audio_qc, num_samples = normalize_audio(
        Path(audio_path),
        work_dir,
        pad_s=pad_s,
        max_duration_s=max_duration_s,
        silence_threshold_db=silence_threshold_db,
    )
    return NormalizedAssets(
        row_id=row.id,
        audio_16k=str(audio_16k),
        audio_master=str(master),
        image=str(image),
        width=width,
        height=height,
        duration_s=audio_qc.duration_s,
        num_samples=num_samples,
        script=normalize_script(row.script),
        audio_qc=audio_qc,
        image_qc=image_qc,
    )
