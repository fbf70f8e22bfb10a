"""faster-whisper through tasks/speech/transcribe.py, on a tiny random Whisper converted the way real ones are.

The test builds a Whisper with the real architecture and random weights (transformers), a byte-level
BPE tokenizer with Whisper's special tokens (tokenizers), converts both with CTranslate2's converter
into a faster-whisper folder, and loads that folder through ``load_whisper``, the loader a real model
goes through; and the language check with Whisper's detection as its audio evidence. Random weights hear
gibberish in a random language: the tests check the contract
(types, codes, probabilities, timings inside the audio and in order), never the words.
"""

from __future__ import annotations

import itertools
import json
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
from spoken import SR, espeak, row_inputs

from flows.settings import BatchSettings
from flows.steps import speech_step
from tasks.records import RowFailure, SpeechAnalysis, WordTiming
from tasks.speech.language import check_language, should_skip
from tasks.speech.transcribe import check_whisper_folder, detect_language, load_whisper, transcribe

TEXT_TOKENS = 50_257  # as in OpenAI's multilingual vocabulary: text tokens, then <|endoftext|>
VOCAB = 51_865  # multilingual Whisper's vocabulary size (99 languages, 1501 timestamps)
WHISPER_LANGUAGES = (  # Whisper's 99 language tokens, in its order
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt "
    "la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af "
    "oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su"
)
LANGUAGES = WHISPER_LANGUAGES.split()


def build_tiny_whisper(root: Path) -> Path:
    """A random tiny multilingual Whisper as a faster-whisper folder (CTranslate2 conversion)."""
    import ctranslate2
    import torch
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    # Text vocabulary: the 256 byte symbols, then the empty token (CTranslate2 takes a Whisper
    # vocabulary holding "" for a multilingual one, as OpenAI's is), then space-led letter strings
    # up to Whisper's text size, so that random output still decodes into separate words.
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[""] = len(vocab)
    for n in itertools.count(2):
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            if len(vocab) == TEXT_TOKENS:
                break
            vocab["Ġ" + "".join(letters)] = len(vocab)
        if len(vocab) == TEXT_TOKENS:
            break
    langs = [f"<|{c}|>" for c in LANGUAGES]
    tasks = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>"]
    specials = ["<|endoftext|>", "<|startoftranscript|>", *langs, *tasks, "<|notimestamps|>"]
    specials += ["<|%.2f|>" % (i * 0.02) for i in range(VOCAB - TEXT_TOKENS - len(specials))]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    assert tok.get_vocab_size() == VOCAB
    ids = tok.get_vocab()
    eot = ids["<|endoftext|>"]

    hf = root / "hf"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(hf)
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(hf)
    config = transformers.WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=80,
        d_model=16,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=1500,
        max_target_positions=448,  # Whisper's 30 s window and 448 tokens
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = []
    model.generation_config.begin_suppress_tokens = [eot]
    model.save_pretrained(hf)

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_model(self, model_class, path, **kwargs):  # noqa: ANN001, ANN202 - the converter's hook
            loaded = super().load_model(model_class, path, **kwargs)
            # transformers 5 drops Whisper's lang_to_id from generation configs on load, and its
            # tokenizers no longer list additional_special_tokens, the converter's fallback: give it back
            # the language token ids, as a real Whisper's generation_config.json holds them.
            loaded.generation_config.lang_to_id = {t: ids[t] for t in langs}
            return loaded

    out = root / "faster-whisper-tiny-random"
    Converter(str(hf), copy_files=["tokenizer.json", "preprocessor_config.json"]).convert(str(out), quantization="int8")
    return out


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    silence = np.zeros(SR // 4, np.float32)
    return np.concatenate([silence, espeak("please review the safety checklist before you start"), silence])


def test_load_detect_and_transcribe_keep_the_contract(whisper_dir: Path, speech: np.ndarray) -> None:
    model = load_whisper(whisper_dir, cpu_threads=1)
    assert load_whisper(str(whisper_dir), cpu_threads=1) is model  # loaded once per process

    code, probability = detect_language(model, speech)
    assert code in LANGUAGES and 0.0 <= probability <= 1.0

    duration = len(speech) / SR
    for language in ("en", None):  # given, and detected by Whisper first
        text, words = transcribe(model, speech, language=language, beam_size=1, temperature=0.0)
        assert isinstance(text, str) and text.strip()
        assert words and all(isinstance(w, WordTiming) and w.word.strip() for w in words)
        assert all(0.0 <= w.start <= w.end <= duration for w in words)
        assert all(a.end <= b.start for a, b in itertools.pairwise(words))
        assert all(0.0 <= w.score <= 1.0 for w in words)
        assert " ".join(w.word for w in words).split() == text.split()

    with pytest.raises(ValueError, match="mono"):
        detect_language(model, np.zeros((2, SR), np.float32))


def test_incomplete_folders_name_what_is_missing(whisper_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_whisper(tmp_path / "nowhere")
    for name, expected in [
        ("model.bin", "model.bin"),
        ("config.json", "config.json"),
        ("tokenizer.json", "tokenizer.json"),
        ("vocabulary.json", "vocabulary.json or vocabulary.txt"),
    ]:
        folder = tmp_path / f"without-{name}"
        shutil.copytree(whisper_dir, folder)
        (folder / name).unlink()
        with pytest.raises(ValueError, match="incomplete") as err:
            load_whisper(folder)
        assert expected in str(err.value) and "preprocessor_config.json" in str(err.value)  # the layout
    assert check_whisper_folder(whisper_dir) == whisper_dir


def test_mel_bins_and_english_only_models(whisper_dir: Path, tmp_path: Path, speech: np.ndarray) -> None:
    # Features of 128 mel bins (large-v3's) for an 80-bin model: caught at load, naming the file.
    wrong = tmp_path / "wrong-mels"
    shutil.copytree(whisper_dir, wrong)
    config = json.loads((wrong / "preprocessor_config.json").read_text())
    (wrong / "preprocessor_config.json").write_text(json.dumps({**config, "feature_size": 128}))
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        load_whisper(wrong)

    # Without the empty token CTranslate2 takes the vocabulary for an English-only one (*.en).
    english = tmp_path / "english-only"
    shutil.copytree(whisper_dir, english)
    tokens = json.loads((english / "vocabulary.json").read_text())
    tokens[tokens.index("")] = "Ġzzzzz"
    (english / "vocabulary.json").write_text(json.dumps(tokens))
    assert detect_language(load_whisper(english, cpu_threads=1), speech) == ("en", 1.0)


def test_speech_step_transcribes_a_row_without_a_script(whisper_dir: Path, tmp_path: Path, speech: np.ndarray) -> None:
    row, assets = row_inputs(tmp_path, speech, script=None)
    plain = speech_step(row, assets, BatchSettings())
    assert not any(f.startswith("transcribed") for f in plain.flags) and plain.words == []  # setting unset

    (tmp_path / "speech.json").unlink()
    analysis = speech_step(row, assets, BatchSettings(whisper_model=str(whisper_dir)))
    transcribed = [f for f in analysis.flags if f.startswith("transcribed: no script; Whisper heard")]
    assert len(transcribed) == 1 and analysis.words  # the transcript's words were timed
    assert all(0.0 <= w.start <= w.end <= len(speech) / SR for w in analysis.words)
    # Whisper's language evidence reached the check: random weights are unsure, so it is noted, not used.
    assert any(f.startswith(("audio_language_unsure", "audio_language", "non_english")) for f in analysis.flags)


EN = "please review the safety checklist before you start working with the machine"
ES = "por favor revise la lista de seguridad antes de empezar a trabajar con la máquina"


def _aligned(fit: float, mismatch: bool = False) -> SpeechAnalysis:
    # The aligner's verdict as a record (tests/speech/test_language.py checks it on real alignments).
    flags = ["audio_script_mismatch: fit 0.05 (threshold 0.15)"] if mismatch else []
    return SpeechAnalysis(aligner="pocketsphinx-en-us", approximate=mismatch, fit_score=fit, flags=flags)


def test_whisper_language_is_the_audio_evidence() -> None:
    fits = _aligned(0.4)
    assert check_language(fits, script=EN, detected=None) == check_language(fits, script=EN)  # unset: as before

    english = check_language(fits, script=EN, expected="en", policy="fail", detected=("en", 0.97))
    assert (english.script_language, english.audio_language, english.flags) == ("en", "en", [])

    # English script, Spanish speech: the script/audio disagreement and the non-English speech, per policy.
    spanish = check_language(fits, script=EN, policy="skip", detected=("es", 0.9))
    assert spanish.audio_language == "es" and should_skip(spanish)
    assert any(f.startswith("script_audio_language_mismatch") and "'es'" in f for f in spanish.flags)
    assert any(f.startswith("non_english: the speech is 'es' by Whisper") for f in spanish.flags)
    with pytest.raises(RowFailure, match="script_audio_language_mismatch"):
        check_language(fits, script=EN, policy="fail", detected=("es", 0.9))

    # Spanish script and speech, the manifest claiming English: flagged, and non-English.
    claimed = check_language(fits, script=ES, expected="en", detected=("es", 0.9))
    assert any(f.startswith("audio_language: Whisper hears 'es'") for f in claimed.flags)
    assert not any(f.startswith("script_audio_language_mismatch") for f in claimed.flags)

    # English speech that does not say the script: a wrong file, not a language problem.
    wrong = check_language(_aligned(0.05, mismatch=True), script=EN, detected=("en", 0.95))
    assert wrong.audio_language == "en" and any(f.startswith("wrong_file_or_script") for f in wrong.flags)

    # An unsure detection is noted and not used.
    unsure = check_language(fits, script=EN, detected=("de", 0.2))
    assert unsure.audio_language == "en" and any(f.startswith("audio_language_unsure") for f in unsure.flags)
