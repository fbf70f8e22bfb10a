"""Caption cues from word timings: layout and timing rules, SRT/WebVTT syntax, segment shifting."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.captions import (
    cues_for_segment,
    cues_from_words,
    even_spread_words,
    layout_lines,
    to_srt,
    to_webvtt,
    write_captions,
)
from tasks.records import Cue, Segment, WordTiming

SCRIPT = (
    "Hello there, and welcome to our short course on safety at work. Today we will look at three "
    "things: how to lift heavy boxes, how to report a hazard, and what to do when the fire alarm "
    "sounds. Ready? Let us begin. First, lifting. Bend your knees, keep your back straight, and "
    "hold the load close to your body. Never twist while you carry something heavy; turn with "
    "your feet instead. If a load is too heavy, ask a colleague for help or use a trolley."
)

SRT_STAMP = re.compile(r"^(\d{2}):(\d{2}):(\d{2}),(\d{3}) --> (\d{2}):(\d{2}):(\d{2}),(\d{3})$")
VTT_STAMP = re.compile(r"^(\d{2}):(\d{2}):(\d{2})\.(\d{3}) --> (\d{2}):(\d{2}):(\d{2})\.(\d{3})$")


def _words(text: str) -> list[str]:
    return text.split()


def _seconds(groups: tuple[str, ...]) -> tuple[float, float]:
    h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, groups)
    return h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000


def _check_hard_rules(cues: list[Cue], words: list[WordTiming], max_chars: int = 42, max_lines: int = 2) -> None:
    # Every word appears once, in order.
    assert " ".join(c.text.replace("\n", " ") for c in cues).split() == [w.word for w in words]
    prev_end = 0.0
    for cue in cues:
        lines = cue.text.split("\n")
        assert 1 <= len(lines) <= max_lines, cue
        for line in lines:
            assert line == line.strip() and line
            assert len(line) <= max_chars or " " not in line, cue  # only a lone over-long word may exceed
        assert cue.end > cue.start, cue
        assert cue.end - cue.start <= 7.0 + 1e-9, cue
        assert cue.start >= prev_end - 1e-9, "cues overlap or are out of order"
        prev_end = cue.end


def test_realistic_script_meets_every_rule() -> None:
    for duration in (25.0, 40.0, 60.0):
        words = even_spread_words(SCRIPT, duration)
        cues = cues_from_words(words, until=duration)
        _check_hard_rules(cues, words)
        for cue in cues:
            assert 1.0 - 1e-9 <= cue.end - cue.start <= 7.0 + 1e-9, cue
        assert cues[-1].end <= duration
        # Cues follow their words: each starts no later than its first word.
        assert cues[0].start <= words[0].start + 1e-9


def test_breaks_at_sentence_ends() -> None:
    words = even_spread_words(SCRIPT, 40.0)
    cues = cues_from_words(words)
    ends = [c.text[-1] for c in cues]
    # Most cues end at punctuation, and none ends mid-sentence when the next begins a sentence.
    assert sum(e in ".,;:?!" for e in ends) >= len(cues) - 1
    assert any(c.text.startswith("Ready?") for c in cues)


def test_breaks_at_a_pause_without_punctuation() -> None:
    # Ten words, no punctuation, a 1.2 s silence after the fifth: the cut goes there.
    words, t = [], 0.0
    for k, w in enumerate(_words("we make things that people like and they buy them")):
        words.append(WordTiming(word=w, start=t, end=t + 0.3))
        t += 0.35 + (1.2 if k == 4 else 0.0)
    cues = cues_from_words(words)
    assert [c.text.replace("\n", " ") for c in cues] == ["we make things that people", "like and they buy them"]


def test_short_sentences_merge_instead_of_flashing() -> None:
    words = [
        WordTiming(word="Hi.", start=0.0, end=0.3),
        WordTiming(word="I'm", start=0.4, end=0.6),
        WordTiming(word="Ann.", start=0.65, end=1.0),
    ]
    cues = cues_from_words(words)
    assert len(cues) == 1 and cues[0].text == "Hi. I'm Ann."
    assert cues[0].end - cues[0].start >= 1.0


def test_long_monologue_respects_max_duration() -> None:
    # 30 s of evenly spoken words without punctuation or pauses.
    words = [WordTiming(word="word", start=k * 0.25, end=k * 0.25 + 0.2) for k in range(120)]
    cues = cues_from_words(words)
    _check_hard_rules(cues, words)
    assert len(cues) >= 30 / 7


def test_layout_is_balanced_and_prefers_punctuation() -> None:
    lines = layout_lines(_words("the quick brown fox jumps over the lazy dog and runs far away"))
    assert len(lines) == 2 and abs(len(lines[0]) - len(lines[1])) <= 8
    lines = layout_lines(_words("Today we will look at three things: how to lift heavy boxes,"))
    assert lines == ["Today we will look at three things:", "how to lift heavy boxes,"]
    assert layout_lines(["short", "line"]) == ["short line"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=14),
            st.sampled_from(["", "", "", ",", ".", "?"]),
            st.floats(0.05, 0.9),
            st.floats(0.0, 1.5),
        ),
        min_size=1,
        max_size=80,
    )
)
def test_hard_rules_hold_for_any_timing(spec: list[tuple[str, str, float, float]]) -> None:
    words, t = [], 0.0
    for text, punct, length, gap in spec:
        words.append(WordTiming(word=text + punct, start=t, end=t + length))
        t += length + gap
    cues = cues_from_words(words)
    _check_hard_rules(cues, words)


def test_even_spread_covers_duration_in_order() -> None:
    words = even_spread_words("One, two three. Four", 8.0)
    assert [w.word for w in words] == ["One,", "two", "three.", "Four"]
    assert words[0].start == 0.0 and abs(words[-1].end - 8.0) < 1e-3
    for a, b in zip(words, words[1:], strict=False):
        assert a.start < a.end <= b.start
    # Longer words get more time; a sentence end gets a longer pause than a plain space.
    assert words[2].end - words[2].start > words[1].end - words[1].start
    assert words[3].start - words[2].end > words[2].start - words[1].end
    assert even_spread_words("   ", 5.0) == [] and even_spread_words("hi", 0.0) == []


def test_srt_and_webvtt_syntax(tmp_path: Path) -> None:
    cues = [
        Cue(start=0.0, end=1.5, text="Fish & chips\n<b>cost</b> 5 --> 6"),
        Cue(start=61.25, end=3725.999, text="Second cue"),
    ]
    srt = to_srt(cues)
    blocks = srt.strip("\n").split("\n\n")
    assert len(blocks) == 2
    for k, (block, cue) in enumerate(zip(blocks, cues, strict=True), start=1):
        lines = block.split("\n")
        assert lines[0] == str(k)
        m = SRT_STAMP.match(lines[1])
        assert m, lines[1]
        start, end = _seconds(m.groups())
        assert abs(start - cue.start) < 1e-3 and abs(end - cue.end) < 1e-3
    assert "01:02:05,999" in srt

    vtt = to_webvtt(cues)
    assert vtt.startswith("WEBVTT\n\n")
    vblocks = vtt.strip("\n").split("\n\n")[1:]
    assert len(vblocks) == 2
    for block in vblocks:
        assert VTT_STAMP.match(block.split("\n")[0]), block
    assert "Fish &amp; chips" in vtt and "&lt;b&gt;cost&lt;/b&gt; 5 --&gt; 6" in vtt

    # ffmpeg's own SRT and WebVTT demuxers read back one event per cue.
    files = write_captions(cues, tmp_path / "row.v1")
    assert set(files) == {"srt", "vtt"} and files["srt"].name == "row.v1.srt"
    for path in files.values():
        out = subprocess.run(
            ["ffprobe", "-v", "error", "-count_packets", "-show_entries", "stream=nb_read_packets,codec_name",
             "-of", "csv=p=0", str(path)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert out.stdout.strip().split(",")[-1] == "2", out.stdout
    assert not list(tmp_path.glob("*.part*"))


def test_cues_for_segment_clips_and_shifts() -> None:
    cues = [Cue(start=0.5, end=2.0, text="a"), Cue(start=9.0, end=11.0, text="b"), Cue(start=12.0, end=13.0, text="c")]
    seg = Segment(
        index=1, start_sample=160_000, end_sample=192_000, start_s=10.0, end_s=12.0, frames=32, clips=1, seed=1
    )
    out = cues_for_segment(cues, seg)
    assert out == [Cue(start=0.0, end=1.0, text="b")]


def test_words_not_found_never_get_a_cue_of_their_own() -> None:
    # "umbrella" and "elephant" were not found in the audio (zero length at the previous word's end);
    # so was the first word. Their text rides with a timed word and every cue lasts longer than zero.
    words = [
        WordTiming(word="Well,", start=0.0, end=0.0, score=0.0, found=False, note="not found: quiet"),
        WordTiming(word="hello", start=0.5, end=0.9),
        WordTiming(word="umbrella", start=0.9, end=0.9, score=0.0, found=False, note="not found: squeezed"),
        WordTiming(word="there.", start=0.95, end=1.4),
        WordTiming(word="elephant", start=1.4, end=1.4, score=0.0, found=False, note="not found: quiet"),
        WordTiming(word="Bye.", start=9.0, end=9.4),
    ]
    cues = cues_from_words(words, until=10.0)
    assert all(c.end > c.start for c in cues)
    text = " ".join(c.text.replace("\n", " ") for c in cues)
    assert text == "Well, hello umbrella there. elephant Bye."
    assert cues[0].start == 0.5  # the cue starts with the first word heard, not at the missing one
    # Only zero-length words: nothing to time, no cue.
    assert cues_from_words([WordTiming(word="x", start=1.0, end=1.0, found=False)]) == []
