"""Speech stage: a row's script aligned to its 16 kHz audio, one WordTiming per script word.

One module per job, in the order a row meets them:

* ``transcribe``: faster-whisper (optional): the audio's language, and a transcript for a row
  without a script.
* ``script``: what the script says: its words and the tokens each is spoken as.
* ``offline``: the default aligner (pocketsphinx, nothing to download).
* ``ctc``: the aligner for a Hugging Face Wav2Vec2ForCTC folder.
* ``verdict``: the flags and failures both aligners give the same way (fit, words not spoken,
  mismatch, empty script, no sound).
* ``language``: the language checks and the batch's language policy.

``align_row`` picks the aligner for a row.
"""

from __future__ import annotations

from pathlib import Path

from tasks.records import MODEL_SAMPLE_RATE, SpeechAnalysis
from tasks.speech.ctc import ENGLISH_FOLDER, cached_ctc_model
from tasks.speech.offline import align_words
from tasks.speech.samples import AudioInput, mono_16k

__all__ = ["align_row", "align_words", "alignment_to_json", "resolve_alignment_model"]


def resolve_alignment_model(alignment_model: str | None, checkpoint: str | None, language: str | None) -> str | None:
    """The CTC model folder to align with, or None for the offline aligner.

    ``alignment_model`` when set; else, for English (or unknown) rows, the checkpoint's
    ``wav2vec2-large-xlsr-53-english`` folder when the checkpoint is a local folder holding it.
    """
    if alignment_model:
        return alignment_model
    if checkpoint and "://" not in checkpoint and (language or "en").lower().startswith("en"):
        english = Path(checkpoint) / ENGLISH_FOLDER
        if english.is_dir():
            return str(english)
    return None


def align_row(
    audio_16k: AudioInput,
    script: str,
    *,
    sample_rate: int = MODEL_SAMPLE_RATE,
    model_folder: str | None = None,
    device: str = "cpu",
) -> SpeechAnalysis:
    """Align with the CTC model in ``model_folder`` (``ctc``, loaded once per process) when one is
    given, else with the offline aligner (``offline.align_words``). ``audio_16k``: mono samples at
    ``sample_rate``, or the path of a mono 16 kHz file (the offline aligner reads it a block at a time,
    the CTC model a window at a time)."""
    if not model_folder:
        return align_words(audio_16k, script, sample_rate=sample_rate)
    audio = mono_16k(audio_16k, sample_rate, "align_row")  # before a model is loaded for it
    return cached_ctc_model(model_folder, device).align(audio, script)


def alignment_to_json(analysis: SpeechAnalysis) -> dict:
    """The ``s2v-batch align --json`` document: {"words": [{"word", "start", "end", "score", "found", "note"}, ...]}
    with the evidence beside it: "aligner", "approximate", "fit_score", "words_not_found" and "flags"."""
    return {
        "words": [
            {"word": w.word, "start": w.start, "end": w.end, "score": w.score, "found": w.found, "note": w.note}
            for w in analysis.words
        ],
        "aligner": analysis.aligner,
        "approximate": analysis.approximate,
        "fit_score": analysis.fit_score,
        "words_not_found": [w.word for w in analysis.words if not w.found],
        "flags": analysis.flags,
    }
