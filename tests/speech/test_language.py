"""Language checks on real alignments of espeak-ng speech and on lingua's script detection."""

from __future__ import annotations

import numpy as np
import pytest
from spoken import SR, espeak

from tasks.records import RowFailure, SpeechAnalysis
from tasks.speech.language import SKIP_FLAG, check_language, detect_script_language, should_skip
from tasks.speech.offline import align_words

EN = "please review the safety checklist before you start working with the machine"
ES = "por favor revise la lista de seguridad antes de empezar a trabajar con la máquina"


@pytest.fixture(scope="module")
def english() -> SpeechAnalysis:
    # Word by word with short pauses: the bundled acoustic model fits espeak-ng's isolated words
    # well; its continuous synthetic speech is too far from the human speech the model knows.
    parts = []
    for w in EN.split():
        parts += [espeak(w, "en-us", speed=165), np.zeros(SR // 10, np.float32)]
    return align_words(np.concatenate([np.zeros(SR // 4, np.float32), *parts]), EN)


@pytest.fixture(scope="module")
def spanish_audio_english_script() -> SpeechAnalysis:
    return align_words(espeak(ES, "es", speed=165), EN)


def test_script_language_detection() -> None:
    assert detect_script_language(EN)[0] == "en"
    assert detect_script_language(ES)[0] == "es"
    assert detect_script_language("Hallo") == (None, 0.0)  # too short to judge
    assert detect_script_language(None) == (None, 0.0)


def test_english_speech_with_its_script_passes_every_policy(english: SpeechAnalysis) -> None:
    for policy in ("warn", "skip", "fail"):
        out = check_language(english, script=EN, expected="en", policy=policy)
        assert (out.script_language, out.audio_language) == ("en", "en")
        assert out.flags == english.flags and not should_skip(out)


def test_wrong_language_audio_follows_the_policy(spanish_audio_english_script: SpeechAnalysis) -> None:
    analysis = spanish_audio_english_script
    warned = check_language(analysis, script=EN, policy="warn")
    assert warned.audio_language is None
    flag = next(f for f in warned.flags if f.startswith("audio_not_english_or_wrong_file"))
    assert f"{analysis.fit_score:.2f}" in flag
    assert not should_skip(warned)

    skipped = check_language(analysis, script=EN, policy="skip")
    assert should_skip(skipped) and SKIP_FLAG in skipped.flags

    with pytest.raises(RowFailure) as info:
        check_language(analysis, script=EN, policy="fail")
    assert info.value.field == "audio" and "worst_stretch" in info.value.reason  # a wrong file, not a language


def test_non_english_script_and_expected_language(english: SpeechAnalysis) -> None:
    spanish = check_language(english, script=ES, policy="warn")
    assert spanish.script_language == "es"
    assert any(f.startswith("non_english: the speech is 'es'") for f in spanish.flags)
    mismatch = check_language(english, script=EN, expected="de", policy="skip")
    assert any(f.startswith("script_language: the script reads as 'en'") for f in mismatch.flags)
    assert should_skip(mismatch)
    with pytest.raises(ValueError, match="policy"):
        check_language(english, script=EN, policy="ignore")


def test_mismatch_and_language_policies_act_apart(
    english: SpeechAnalysis, spanish_audio_english_script: SpeechAnalysis
) -> None:
    # Audio that does not say its script follows the mismatch policy, whatever the language policy says.
    wrong_file = spanish_audio_english_script
    assert should_skip(check_language(wrong_file, script=EN, policy="warn", mismatch_policy="skip"))
    assert not should_skip(check_language(wrong_file, script=EN, policy="skip", mismatch_policy="warn"))
    with pytest.raises(RowFailure) as info:
        check_language(wrong_file, script=EN, policy="warn", mismatch_policy="fail")
    assert info.value.field == "audio"
    # Speech that is not English but fits its script follows the language policy only.
    spanish = check_language(english, script=ES, policy="warn", mismatch_policy="skip")
    assert any(f.startswith("non_english") for f in spanish.flags) and not should_skip(spanish)
    with pytest.raises(RowFailure) as info:
        check_language(english, script=ES, policy="fail", mismatch_policy="warn")
    assert info.value.field == "language"
    with pytest.raises(ValueError, match="mismatch policy"):
        check_language(english, script=EN, mismatch_policy="ignore")
