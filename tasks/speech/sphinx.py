"""pocketsphinx plumbing shared by the offline aligner (``tasks/speech/offline.py``) and its fit score
(``tasks/speech/fit.py``): the bundled US-English model, the decoders' feature options, the frame
rate, and decoding one stretch of audio."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from pocketsphinx import Config, Decoder, get_model_path

FRAME_RATE = 100
"""pocketsphinx frames per second (10 ms shift)."""
BYTES_PER_FRAME = 16000 // FRAME_RATE * 2
"""Bytes of 16 kHz s16 PCM per frame."""
FILLERS = ("<s>", "</s>", "<sil>", "[NOISE]", "[SPEECH]", "SIL", "+NSN+", "+SPN+", "(NULL)")
"""Segments that are not script words or phones ("(NULL)": a grammar's null transition, such as a
chunk's early end)."""


@functools.cache
def model_path() -> str:
    """The acoustic model that ships in the pocketsphinx wheel."""
    return get_model_path("en-us/en-us")


@functools.cache
def feature_options() -> dict[str, str | bool]:
    """The bundled model's feature parameters (its feat.params) with pocketsphinx's noise removal off.

    A decoder reads feat.params over its own options, and that file turns on noise removal, whose
    running noise estimate carries over from one utterance to the next: the same audio aligned
    after another file came out differently (a word lost). Resetting the estimate per utterance
    (``start_stream``) left each file's first seconds poorly heard, which narrowed the gap between
    matching and wrong scripts' fits; without noise removal the results are the audio's alone, as
    accurate on the noisy conditions of bench/align_accuracy.py, and the fits separate as well.
    So the decoders get the file's parameters as options and an empty feat.params.
    """
    known = Config()
    options: dict[str, str | bool] = {}
    for line in (Path(model_path()) / "feat.params").read_text().splitlines():
        key, _, value = line.strip().lstrip("-").partition(" ")
        if key in known:  # the file also names training-only settings ("-model ptm")
            options[key] = {"yes": True, "no": False}.get(value, value)
    return {**options, "remove_noise": False, "featparams": os.devnull}


def decoder(**options: object) -> Decoder:
    """A decoder of 16 kHz audio with the bundled model and ``options`` (no search until one is added)."""
    return Decoder(hmm=model_path(), lm=None, samprate=16000, loglevel="FATAL", **feature_options(), **options)


def decode(decoder: Decoder, pcm16: bytes) -> None:
    """Decode one stretch of audio as a whole utterance (cepstral mean over all of it)."""
    decoder.start_utt()
    decoder.process_raw(pcm16, full_utt=True)
    decoder.end_utt()
