"""Language checks: the script's language (lingua) and whether the speech is English.

Wan2.2-S2V's audio encoder (wav2vec2-large-xlsr-53-english) is English-trained, so
non-English speech lip-syncs worse; a wrong audio file wastes the GPU hours outright.

* Script language: lingua in its low-accuracy mode over all its languages (trigram
  models only: ~0.5 s to load, ~70 MB, reliable on sentences; a script under
  ``MIN_WORDS`` letter words is not judged).
* Audio language: how well the English aligner fits the audio (``tasks.speech``). Without
  its ``audio_script_mismatch`` flag the audio is English speech saying the script:
  ``audio_language = "en"``. With it the audio is either not English or not this
  script, and the English aligner cannot tell which; ``audio_language`` stays None and
  the evidence (fit, words not found, worst stretch) is in the aligner's flags.
* With a Whisper model configured (``tasks/speech/transcribe.py``), the caller passes Whisper's
  detected language and probability (``detected``): at ``MIN_AUDIO_CONFIDENCE`` or above it
  is the audio language and the judged spoken language; a script that reads as another
  language than the audio is flagged ``script_audio_language_mismatch`` (wrong file or
  wrong script), which triggers the policy. Below it Whisper is only noted in a flag.

Two policies act on what the check finds: the language policy on speech judged not English
(``non_english``: the model still renders it, with weaker lip-sync), and the mismatch policy on
audio that does not say its script (``wrong_file_or_script``, ``audio_not_english_or_wrong_file``,
``script_audio_language_mismatch``: most often the wrong file, whose video would carry the wrong
captions after hours of GPU time; default ``skip``, flows/settings.py). Each is one of:

* ``warn``: flags are added, the row goes on.
* ``skip``: flags plus the marker flag ``SKIP_FLAG`` ("skip") are added; the caller
  sees ``SKIP_FLAG in analysis.flags`` (or ``should_skip(analysis)``) and records the
  row as skipped without generating.
* ``fail``: RowFailure("language", reason with the evidence) is raised.
"""

from __future__ import annotations

import functools
import re

from tasks.records import RowFailure, SpeechAnalysis

POLICIES = ("warn", "skip", "fail")
SKIP_FLAG = "skip"
LANGUAGE_FLAGS = ("non_english",)
"""Flags the language policy acts on."""
MISMATCH_FLAGS = ("wrong_file_or_script", "audio_not_english_or_wrong_file", "script_audio_language_mismatch")
"""Flags the mismatch policy acts on: the audio does not say its script."""
MIN_WORDS = 3
MIN_CONFIDENCE = 0.6
MIN_AUDIO_CONFIDENCE = 0.5
"""Whisper's language probability at which its detection is taken as the audio language (faster-whisper
stops looking at further windows above the same 0.5)."""


@functools.cache
def _detector():  # noqa: ANN202 - lingua's type
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()


def detect_script_language(script: str | None) -> tuple[str | None, float]:
    """ISO 639-1 code (lowercase) of the script's language and lingua's confidence; (None, 0) if unsure."""
    if not script or len(re.findall(r"[^\W\d_]{2,}", script)) < MIN_WORDS:
        return None, 0.0
    values = _detector().compute_language_confidence_values(script)
    if not values or values[0].value < MIN_CONFIDENCE:
        return None, values[0].value if values else 0.0
    return values[0].language.iso_code_639_1.name.lower(), float(values[0].value)


def should_skip(analysis: SpeechAnalysis) -> bool:
    """True when the language policy decided to skip the row."""
    return SKIP_FLAG in analysis.flags


def check_language(
    analysis: SpeechAnalysis,
    *,
    script: str | None = None,
    expected: str | None = None,
    policy: str = "warn",
    detected: tuple[str, float] | None = None,
    mismatch_policy: str | None = None,
) -> SpeechAnalysis:
    """Fill in script/audio language, add flags, and apply the policy (see the module docstring).

    ``script``: the row's script text (for lingua); ``expected``: the manifest's ISO 639-1
    language of the speech, if given; ``detected``: the audio's (ISO 639-1 code, probability) from a
    Whisper language detector, if one is configured; ``mismatch_policy``: what audio that does not say
    its script does (None: the language ``policy``). Returns a new SpeechAnalysis; raises RowFailure
    for a ``fail`` policy that applies and ValueError for an unknown policy.
    """
    mismatch_policy = mismatch_policy or policy
    for name, value in (("language", policy), ("mismatch", mismatch_policy)):
        if value not in POLICIES:
            raise ValueError(f"{name} policy must be one of {POLICIES}, got {value!r}")
    out = analysis.model_copy(deep=True)
    expected = expected.lower().strip() if expected else None
    lang, confidence = detect_script_language(script)
    out.script_language = lang
    mismatch = any(f.startswith("audio_script_mismatch") for f in analysis.flags)
    fits = analysis.fit_score is not None and not mismatch
    out.audio_language = "en" if fits and not analysis.approximate else None

    problems: list[str] = []
    if expected and lang and lang != expected:
        out.flags.append(
            f"script_language: the script reads as '{lang}' (confidence {confidence:.2f}), "
            f"the manifest says '{expected}'"
        )
    spoken = expected or lang
    source = "the manifest's language" if expected else f"the script's language (confidence {confidence:.2f})"
    heard = None
    if detected is not None:
        code, probability = detected[0].lower().strip(), float(detected[1])
        whisper = f"Whisper hears '{code}' (probability {probability:.2f})"
        if probability >= MIN_AUDIO_CONFIDENCE:
            heard = out.audio_language = code
            # What the audio says outweighs what the manifest or script claim about it.
            spoken, source = code, "Whisper's language detection"
            if expected and expected != code:
                out.flags.append(f"audio_language: {whisper}, the manifest says '{expected}'")
            if lang and lang != code:
                problems.append(
                    f"script_audio_language_mismatch: the script reads as '{lang}' (confidence "
                    f"{confidence:.2f}) but {whisper}: wrong audio file or wrong script"
                )
        else:
            out.flags.append(f"audio_language_unsure: {whisper}, below {MIN_AUDIO_CONFIDENCE}; not used")
    if spoken and spoken != "en":
        problems.append(
            f"non_english: the speech is '{spoken}' by {source}; the S2V audio encoder is "
            "English-trained, so lip-sync will be weaker"
        )
    elif mismatch and heard == "en":
        problems.append(
            f"wrong_file_or_script: the speech is English ({whisper}) but the English aligner fits it at "
            f"{analysis.fit_score:.2f} and does not find the script in it: wrong audio file or wrong script"
        )
    elif mismatch:
        problems.append(
            f"audio_not_english_or_wrong_file: the English aligner fits the audio at {analysis.fit_score:.2f} "
            "and does not find the script in it; the speech is not English or not this script"
        )
    out.flags += problems
    acting = {policy if p.startswith(LANGUAGE_FLAGS) else mismatch_policy for p in problems}
    if "fail" in acting:
        evidence = [f for f in analysis.flags if f.startswith(("worst_stretch", "audio_script_mismatch"))]
        field = "language" if policy == "fail" and any(p.startswith(LANGUAGE_FLAGS) for p in problems) else "audio"
        raise RowFailure(field, "; ".join(problems + evidence))
    if "skip" in acting:
        out.flags.append(SKIP_FLAG)
    return out
