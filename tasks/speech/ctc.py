"""Forced alignment with a CTC model (a Hugging Face ``Wav2Vec2ForCTC`` folder), offline.

The method is whisperx's (``whisperx.align``, after torchaudio's forced-alignment tutorial),
written here with numpy and torch only: whisperx itself imports torchaudio, which does not
load on this project's torch, and pins an older torch.

1. The script is split into words at whitespace; numerals, currencies, percentages and
   abbreviations are first spelled out (``tasks.speech.script.spoken_words``: "$20" ->
   "twenty dollars"); words in other scripts keep their own letters. Words are joined by the
   model's word delimiter ("|"). Characters the model's vocabulary lacks are matched by a
   wildcard (each frame's best non-blank log-probability), as whisperx does.
2. The model gives frame-level log-probabilities (50 frames a second) over its characters,
   computed in windows of ``WINDOW_S`` with ``CONTEXT_S`` of context on each side, so
   memory stays bounded for long audio.
3. A Viterbi pass over the standard CTC topology (blank, c1, blank, c2, ..., blank; a
   character may repeat over frames, a blank may be skipped between different
   characters) finds the best path; backtracking gives each character its frames. For
   long audio the pass is restricted to a band of +-``BAND_S`` around a constant speaking
   rate, which bounds the backpointer memory (frames x band states, one byte each).
4. A word spans its first character's first frame to its last character's last frame;
   its score is the mean, over its characters, of the character's mean probability on
   its frames (whisperx's char score). The fit score is the mean word score.

The thresholds below are provisional: no trained CTC model can be downloaded here, so
they could not be calibrated the way the offline aligner's were (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.records import MODEL_SAMPLE_RATE, RowFailure, SpeechAnalysis, WordTiming
from tasks.speech.activity import analyse, snap_to_pauses
from tasks.speech.samples import AudioInput, Samples, mono_16k
from tasks.speech.script import spoken_words
from tasks.speech.verdict import empty_script, judge_fit, require_sound

if TYPE_CHECKING:  # torch and transformers load only when a model is (tasks.speech imports this module)
    import torch

ENGLISH_FOLDER = "wav2vec2-large-xlsr-53-english"
"""The English CTC model inside the Wan2.2-S2V-14B checkpoint (also its audio encoder)."""
FRAME_SAMPLES = 320
"""wav2vec2's feature stride: 20 ms at 16 kHz."""
RECEPTIVE_SAMPLES = 400
WINDOW_S = 30.0
CONTEXT_S = 1.0
"""Emissions are computed on WINDOW_S of audio at a time with CONTEXT_S either side, then joined."""
BAND_S = 30.0
"""Alignment paths may stray this far from a constant speaking rate (audio is trimmed of long silences)."""
NOT_SPOKEN_SCORE = 0.05
"""A word whose characters average below this probability, laid over audio at least NOT_FOUND_QUIET
quiet (tasks/speech/activity.py), was not found in the audio. The score threshold is provisional (a
trained model could not be measured here); the quiet test is measured (docs/benchmarks.md), and it
keeps a random or ill-matched model from dropping words that are plainly in the audio."""
NOT_FOUND_QUIET = 0.5
MISMATCH_FIT = 0.25
"""Below this fit the audio does not say the script (provisional; a trained model scores matching speech
far higher, a random one ~1/vocabulary)."""
MAX_UNKNOWN_SHARE = 0.3
"""When more of the script's characters than this are outside the model's vocabulary, the wildcard
(any character) carries the alignment and its score means nothing: a model for another language."""

_REQUIRED = {
    "config.json": "the model configuration",
    "preprocessor_config.json": "the feature extractor (Wav2Vec2FeatureExtractor)",
    "vocab.json": "the character vocabulary (Wav2Vec2CTCTokenizer)",
}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_LAYOUT = (
    "expected a Hugging Face Wav2Vec2ForCTC folder: config.json, model.safetensors (or pytorch_model.bin), "
    "preprocessor_config.json, vocab.json (+ tokenizer_config.json, special_tokens_map.json)"
)


# --------------------------------------------------------------------------- Viterbi core


def ctc_viterbi(log_probs: np.ndarray, targets: list[int], blank: int, band: int | None = None) -> np.ndarray | None:
    """Best CTC alignment of ``targets`` to ``log_probs`` [frames, classes].

    Returns, per frame, the index of the target it emits or -1 for a blank; None when the
    targets cannot fit in the frames (or the path leaves the band). ``band``: half-width,
    in CTC states, of the diagonal band searched (None: the whole trellis).
    Hand-written rather than torchaudio.functional.forced_align, which is unavailable here.
    """
    num_frames = log_probs.shape[0]
    num_states = 2 * len(targets) + 1
    if num_frames == 0 or not targets:
        return None
    labels = np.full(num_states, blank, dtype=np.int64)
    labels[1::2] = targets
    # A label state may be entered from two states back (skipping the blank) unless it repeats the label.
    skip = np.zeros(num_states, dtype=bool)
    skip[3::2] = np.asarray(targets[1:]) != np.asarray(targets[:-1])
    half = num_states if band is None else max(int(band), 2)

    def span(t: int) -> tuple[int, int]:
        centre = (t * (num_states - 1)) // max(num_frames - 1, 1)
        return max(0, centre - half), min(num_states, centre + half + 1)

    neg = -np.inf
    score = np.full(num_states + 2, neg)  # two leading pads so s-1 and s-2 never wrap
    lo, hi = span(0)
    hi0 = min(hi, 2)
    score[2 + lo : 2 + hi0] = log_probs[0, labels[lo:hi0]]
    spans = [(lo, hi)]
    back = [np.zeros(hi - lo, dtype=np.int8)]
    plo, phi = lo, hi
    for t in range(1, num_frames):
        lo, hi = span(t)
        stay = score[2 + lo : 2 + hi]
        step = score[1 + lo : 1 + hi]
        jump = np.where(skip[lo:hi], score[lo:hi], neg)
        choices = np.stack([stay, step, jump])
        best = choices.argmax(axis=0).astype(np.int8)
        value = np.take_along_axis(choices, best[None].astype(np.int64), axis=0)[0] + log_probs[t, labels[lo:hi]]
        score[2 + plo : 2 + phi] = neg
        score[2 + lo : 2 + hi] = value
        spans.append((lo, hi))
        back.append(best)
        plo, phi = lo, hi
    last = num_states - 1
    end = last if score[2 + last] >= score[1 + last] else last - 1
    if not np.isfinite(score[2 + end]):
        return None
    states = np.empty(num_frames, dtype=np.int64)
    s = end
    for t in range(num_frames - 1, -1, -1):
        states[t] = s
        lo, hi = spans[t]
        if t > 0:
            s -= int(back[t][s - lo])
    if states[0] > 1:
        return None
    return np.where(states % 2 == 1, (states - 1) // 2, -1)


@dataclass
class CharSpan:
    target: int
    start: int
    end: int
    """Frames [start, end) of one target character."""
    score: float
    """Mean probability of the character on its frames."""


def char_spans(frames: np.ndarray, log_probs: np.ndarray, targets: list[int]) -> list[CharSpan]:
    """Frames and score of each target from a path of ``ctc_viterbi`` (each target has at least one frame)."""
    spans = []
    for k, label in enumerate(targets):
        where = np.flatnonzero(frames == k)
        probs = np.exp(log_probs[where, label])
        spans.append(CharSpan(k, int(where[0]), int(where[-1]) + 1, float(probs.mean())))
    return spans


# --------------------------------------------------------------------------- model


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ValueError(f"CTC alignment model folder {folder} does not exist or is not a folder; {_LAYOUT}")
    for name, what in _REQUIRED.items():
        if not (folder / name).is_file():
            raise ValueError(f"CTC alignment model folder {folder} lacks {name} ({what}); {_LAYOUT}")
    if not any((folder / name).is_file() for name in _WEIGHTS):
        raise ValueError(f"CTC alignment model folder {folder} lacks the weights ({' or '.join(_WEIGHTS)}); {_LAYOUT}")


class CtcAligner:
    """A Wav2Vec2ForCTC model and its processor, ready to align scripts to 16 kHz audio."""

    def __init__(self, model: torch.nn.Module, processor, name: str, device: str = "cpu") -> None:  # noqa: ANN001
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = device
        self.name = name
        vocab = processor.tokenizer.get_vocab()
        # Vocabularies are upper- or lowercase; scripts are matched lowercased, as whisperx does.
        self.vocab = {k.lower(): v for k, v in sorted(vocab.items(), key=lambda kv: kv[0].islower())}
        pad = model.config.pad_token_id
        self.blank = int(pad if pad is not None else processor.tokenizer.pad_token_id or 0)
        delimiter = getattr(processor.tokenizer, "word_delimiter_token", "|") or "|"
        self.delimiter = self.vocab.get(delimiter.lower())

    @property
    def aligner(self) -> str:
        return f"ctc:{self.name}"

    def emissions(self, audio_16k: np.ndarray | Samples) -> np.ndarray:
        """Frame log-probabilities [frames, classes] at 50 Hz of 16 kHz audio, computed window by window
        (a file is read a window at a time)."""
        import torch

        samples = Samples.of(audio_16k)
        if samples.num_samples < RECEPTIVE_SAMPLES:
            samples = Samples.of(np.pad(samples.whole(), (0, RECEPTIVE_SAMPLES - samples.num_samples)))
        total = (samples.num_samples - RECEPTIVE_SAMPLES) // FRAME_SAMPLES + 1
        win = int(WINDOW_S * MODEL_SAMPLE_RATE) // FRAME_SAMPLES  # frames per window
        ctx = int(CONTEXT_S * MODEL_SAMPLE_RATE) // FRAME_SAMPLES
        parts = []
        for f0 in range(0, total, win):
            f1 = min(total, f0 + win)
            c0 = max(0, f0 - ctx)
            a = c0 * FRAME_SAMPLES
            b = min(samples.num_samples, (f1 + ctx - 1) * FRAME_SAMPLES + RECEPTIVE_SAMPLES)
            values = self.processor.feature_extractor(
                samples.window(a, b), sampling_rate=MODEL_SAMPLE_RATE, return_tensors="pt"
            ).input_values
            with torch.inference_mode():
                logits = self.model(values.to(self.device, dtype=next(self.model.parameters()).dtype)).logits[0]
            parts.append(torch.log_softmax(logits.float(), dim=-1)[f0 - c0 : f1 - c0].cpu().numpy())
        return np.concatenate(parts)

    def align(self, audio_16k: AudioInput | Samples, script: str) -> SpeechAnalysis:
        """One WordTiming per whitespace script word, in order, in seconds, score in [0, 1]. ``audio_16k``:
        mono samples at 16 kHz or a mono 16 kHz file, read a window at a time.

        Flags and failures are the shared ones (``tasks/speech/verdict.py``): ``empty_script``,
        ``words_not_spoken``, ``audio_script_mismatch`` (+ ``worst_stretch``), and
        ``script_outside_vocabulary`` when the model's alphabet is not the script's;
        RowFailure("audio") for silence, RowFailure("script") when the script cannot fit.
        """
        audio = mono_16k(audio_16k, MODEL_SAMPLE_RATE, "align")
        duration = audio.duration_s
        words = spoken_words(script or "")
        targets, owner = self._targets(words)
        if not targets:
            return empty_script(self.aligner)
        require_sound(audio, MODEL_SAMPLE_RATE, len(words))
        log_probs = self.emissions(audio)
        unknown = sorted({ch for (_, tokens) in words for ch in "".join(tokens) if ch not in self.vocab})
        unknown_share = sum(t < 0 for t in targets) / sum(o >= 0 for o in owner)  # delimiters aside
        if unknown:  # characters outside the vocabulary: whisperx's wildcard column
            non_blank = np.delete(log_probs, self.blank, axis=1).max(axis=1, keepdims=True)
            log_probs = np.concatenate([log_probs, non_blank], axis=1)
            targets = [t if t >= 0 else log_probs.shape[1] - 1 for t in targets]
        frames_per_s = MODEL_SAMPLE_RATE / FRAME_SAMPLES
        band = (
            None
            if duration <= 2 * BAND_S
            else int(np.ceil(BAND_S * frames_per_s * (2 * len(targets) + 1) / len(log_probs)))
        )
        path = ctc_viterbi(log_probs, targets, self.blank, band)
        if path is None:
            raise RowFailure(
                "script",
                f"the audio does not match the script: its {len(targets)} characters do not fit "
                f"the {duration:.1f} s of audio (too short for the script, or wrong file?)",
            )
        analysis = self._analysis(words, owner, char_spans(path, log_probs, targets), duration, audio)
        if unknown_share > MAX_UNKNOWN_SHARE:
            analysis.approximate = True
            analysis.flags.append(
                f"script_outside_vocabulary: {unknown_share:.0%} of the script's characters "
                f"({''.join(unknown[:20])}) are not in the vocabulary of {self.name}; the timings are not "
                "reliable (a CTC model for the script's language is needed)"
            )
        return analysis

    def _targets(self, words: list[tuple[str, list[str]]]) -> tuple[list[int], list[int]]:
        """Vocabulary ids of the script's characters (-1: not in the vocabulary), the word of each (-1: "|")."""
        targets: list[int] = []
        owner: list[int] = []
        for i, (_, tokens) in enumerate(words):
            for token in tokens:
                if targets and self.delimiter is not None:
                    targets.append(self.delimiter)
                    owner.append(-1)
                for ch in token:
                    targets.append(self.vocab.get(ch, -1))
                    owner.append(i)
        return targets, owner

    def _analysis(
        self, words: list[tuple[str, list[str]]], owner: list[int], spans: list[CharSpan], duration: float,
        audio: Samples,
    ) -> SpeechAnalysis:
        seconds = FRAME_SAMPLES / MODEL_SAMPLE_RATE
        act = analyse(audio)
        raw: list[tuple[str, tuple[float, float] | None, float | None]] = []
        for i, (text, _) in enumerate(words):
            mine = [s for s, o in zip(spans, owner, strict=True) if o == i]
            if mine:
                span = (mine[0].start * seconds, min(mine[-1].end * seconds, duration))
                raw.append((text, span, round(float(np.mean([s.score for s in mine])), 3)))
            else:  # punctuation-only words sit at the previous word's end
                raw.append((text, None, None))
        # A word is not found only when the model scores it low AND the audio under it is quiet.
        missing = {i for i, (_, span, score) in enumerate(raw)
                   if span and score is not None and score < NOT_SPOKEN_SCORE
                   and act.quiet_share(*span) >= NOT_FOUND_QUIET}  # fmt: skip
        kept = [i for i, (_, span, _) in enumerate(raw) if span and i not in missing]
        snapped = dict(zip(kept, snap_to_pauses([raw[i][1] for i in kept], act), strict=True))
        timings: list[WordTiming] = []
        prev_end = 0.0
        for i, (text, span, score) in enumerate(raw):
            if i in snapped:
                start, end = snapped[i]
                timings.append(WordTiming(word=text, start=round(start, 3), end=round(end, 3), score=score))
            else:
                note = None
                if i in missing:
                    note = (f"not found: its characters average {score:.3f} probability (below {NOT_SPOKEN_SCORE}) "
                            f"over {span[0]:.2f}-{span[1]:.2f} s, which is quiet")  # fmt: skip
                timings.append(WordTiming(word=text, start=prev_end, end=prev_end, score=score,
                                          found=i not in missing, note=note))  # fmt: skip
            prev_end = timings[-1].end
        return judge_fit(self.aligner, timings, sorted(missing), mismatch_fit=MISMATCH_FIT,
                         how_missing=f"fit the audio below {NOT_SPOKEN_SCORE} where it is quiet")


def load_ctc_model(folder: str | Path, device: str = "cpu") -> CtcAligner:
    """Load a Wav2Vec2ForCTC folder (model, feature extractor, tokenizer) without any download.

    Raises ValueError naming the missing file and the expected layout when the folder is incomplete.
    """
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Processor

    folder = Path(folder)
    _check_folder(folder)
    try:
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = Wav2Vec2ForCTC.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the CTC alignment model from {folder}: {exc}; {_LAYOUT}") from exc
    processor = Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
    return CtcAligner(model, processor, folder.name, device)


@functools.lru_cache(maxsize=2)
def cached_ctc_model(folder: str, device: str = "cpu") -> CtcAligner:
    """``load_ctc_model`` once per process and folder (the large model takes seconds and ~1.2 GB)."""
    return load_ctc_model(folder, device)
