"""Speech recognition with faster-whisper from a local CTranslate2 model folder.

Two uses in the pipeline (``flows/steps.py``, speech step, when ``whisper_model`` is set):

* ``detect_language``: the audio's spoken language and Whisper's probability for it,
  the audio-side evidence of the language check (``tasks/speech/language.py``).
* ``transcribe``: text and word timings for a row that has no script; the transcript is
  then aligned like a script.

faster-whisper runs on CTranslate2, not torch, so it lives beside torch 2.13 (whisperx does
not: its torchaudio pin does not load here). Nothing is ever downloaded: the folder must hold
a converted model (``ct2-transformers-converter --model openai/whisper-small --output_dir DIR
--copy_files tokenizer.json preprocessor_config.json``, or any ``faster-whisper-*`` folder)::

    DIR/model.bin                  CTranslate2 weights
    DIR/config.json                CTranslate2 Whisper config (language ids, alignment heads)
    DIR/vocabulary.json            vocabulary (or vocabulary.txt)
    DIR/tokenizer.json             Hugging Face tokenizer (faster-whisper would fetch it otherwise)
    DIR/preprocessor_config.json   optional: mel bins (required for 128-mel models, e.g. large-v3)
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.records import MODEL_SAMPLE_RATE, WordTiming
from tasks.speech.verdict import as_mono_16k

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

REQUIRED_FILES = {
    "model.bin": "CTranslate2 weights",
    "config.json": "CTranslate2 Whisper config",
    "tokenizer.json": "Hugging Face tokenizer (copy it in with --copy_files tokenizer.json)",
}
VOCABULARY_FILES = ("vocabulary.json", "vocabulary.txt")
TOKENS_PER_S = 20.0
"""Decoding budget for audio shorter than Whisper's 30 s window: ``max_new_tokens`` is this many per
second of audio. CTranslate2 stops at about half of prompt + budget, so on a first window (a 3-token
prompt) about 10 tokens a second: twice fast speech with its timestamps. It stops Whisper's runaway
repetition on short clips early instead of decoding the full 224 tokens at every fallback temperature."""
MAX_NEW_TOKENS = 220
"""faster-whisper refuses prompt + max_new_tokens above 448; the prompt can hold 224 earlier tokens."""
LAYOUT = (
    "a faster-whisper folder holds model.bin, config.json, vocabulary.json (or vocabulary.txt), "
    "tokenizer.json and optionally preprocessor_config.json, as written by `ct2-transformers-converter "
    "--model openai/whisper-small --output_dir DIR --copy_files tokenizer.json preprocessor_config.json`"
)


def check_whisper_folder(folder: str | Path) -> Path:
    """The folder as a Path when it holds a complete faster-whisper model; ValueError naming what is missing."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(f"Whisper model folder {path} does not exist or is not a folder; {LAYOUT}")
    missing = [f"{name} ({what})" for name, what in REQUIRED_FILES.items() if not (path / name).is_file()]
    if not any((path / name).is_file() for name in VOCABULARY_FILES):
        missing.append("vocabulary.json or vocabulary.txt (vocabulary)")
    if missing:
        raise ValueError(f"Whisper model folder {path} is incomplete, missing: {', '.join(missing)}; {LAYOUT}")
    return path


@functools.lru_cache(maxsize=2)
def _load(folder: str, device: str, compute_type: str, cpu_threads: int) -> WhisperModel:
    from faster_whisper import WhisperModel  # imported here: an optional extra, only needed when configured

    model = WhisperModel(
        folder, device=device, compute_type=compute_type, cpu_threads=cpu_threads, local_files_only=True
    )
    # Without preprocessor_config.json faster-whisper assumes 80 mel bins; a 128-bin model would
    # then fail deep inside CTranslate2 on the first call, so say it here.
    mels = model.feature_extractor.mel_filters.shape[0]
    if mels != model.model.n_mels:
        raise ValueError(
            f"Whisper model folder {folder}: the model takes {model.model.n_mels} mel bins but the features "
            f"have {mels}; copy the model's preprocessor_config.json into the folder"
        )
    # A multilingual conversion that lost its language token ids cannot detect languages.
    config = json.loads((Path(folder) / "config.json").read_text())
    if model.model.is_multilingual and not config.get("lang_ids"):
        raise ValueError(
            f"Whisper model folder {folder}: config.json has no lang_ids, so language detection cannot work; "
            "convert the model again (ct2-transformers-converter) with its generation_config.json present"
        )
    return model


def load_whisper(
    folder: str | Path, device: str = "cpu", compute_type: str = "int8", cpu_threads: int = 0
) -> WhisperModel:
    """The faster-whisper model in ``folder``, loaded once per process per (folder, device, compute type).

    ``device``: "cpu", "cuda" or "auto"; ``compute_type``: CTranslate2's ("int8", "float16",
    "int8_float16", "default", ...); ``cpu_threads``: 0 lets CTranslate2 choose. Raises ValueError
    naming the missing files and the expected layout (module docstring) when the folder is incomplete.
    """
    path = check_whisper_folder(folder)
    return _load(str(path.resolve()), device, compute_type, cpu_threads)


def detect_language(model: WhisperModel, audio_16k: np.ndarray) -> tuple[str, float]:
    """ISO 639-1 code of the speech in mono 16 kHz audio and Whisper's probability for it, in [0, 1].

    Whisper judges the first 30 s window (faster-whisper looks further only when that window is unsure).
    English-only models (``*.en``) cannot tell languages apart: they answer ("en", 1.0).
    """
    audio = as_mono_16k(audio_16k, MODEL_SAMPLE_RATE, "Whisper")
    if not model.model.is_multilingual:
        return "en", 1.0
    language, probability, _ = model.detect_language(audio)
    return str(language), float(min(max(probability, 0.0), 1.0))


def transcribe(
    model: WhisperModel, audio_16k: np.ndarray, language: str | None = None, **options: Any
) -> tuple[str, list[WordTiming]]:
    """Transcribe mono 16 kHz audio: the text and one WordTiming per recognized word, in seconds.

    ``language``: ISO 639-1 code of the speech, or None to let Whisper detect it. ``options`` go to
    faster-whisper's ``WhisperModel.transcribe`` (e.g. ``beam_size``; ``max_new_tokens`` defaults to
    a budget from the duration, see ``TOKENS_PER_S``). A word's score is Whisper's
    probability for it. Timings are clamped into the audio and made non-decreasing, since Whisper's
    cross-attention timings can overlap by a frame between segments.
    """
    audio = as_mono_16k(audio_16k, MODEL_SAMPLE_RATE, "Whisper")
    duration = len(audio) / MODEL_SAMPLE_RATE
    options.setdefault("max_new_tokens", min(MAX_NEW_TOKENS, max(16, math.ceil(TOKENS_PER_S * duration))))
    segments, _ = model.transcribe(audio, language=language, word_timestamps=True, **options)
    texts: list[str] = []
    words: list[WordTiming] = []
    last_end = 0.0
    for segment in segments:  # a generator: decoding happens while iterating
        texts.append(segment.text.strip())
        for w in segment.words or []:
            text = w.word.strip()
            if not text:
                continue
            start = min(max(float(w.start), last_end), duration)
            end = min(max(float(w.end), start), duration)
            words.append(WordTiming(word=text, start=start, end=end, score=float(w.probability)))
            last_end = end
    return " ".join(t for t in texts if t), words
