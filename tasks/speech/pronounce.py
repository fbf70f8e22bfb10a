"""Pronunciations for the offline aligner: letter-to-sound rules and out-of-dictionary words."""

from __future__ import annotations

import re

# Letter-to-sound rules for words the CMU dictionary lacks (brand names, new coinages).
# Hand-written because no grapheme-to-phoneme package on PyPI ships its model offline
# without extra downloads; the timing anchors of the surrounding dictionary words
# matter more than exact phones here. Longest grapheme first.
_G2P = [
    ("tion", "SH AH N"),
    ("sion", "ZH AH N"),
    ("tch", "CH"),
    ("sch", "S K"),
    ("igh", "AY"),
    ("ough", "AO"),
    ("ch", "CH"),
    ("sh", "SH"),
    ("th", "TH"),
    ("ph", "F"),
    ("wh", "W"),
    ("ck", "K"),
    ("ng", "NG"),
    ("qu", "K W"),
    ("gh", ""),
    ("ee", "IY"),
    ("ea", "IY"),
    ("oo", "UW"),
    ("ou", "AW"),
    ("ow", "OW"),
    ("oi", "OY"),
    ("oy", "OY"),
    ("ai", "EY"),
    ("ay", "EY"),
    ("au", "AO"),
    ("aw", "AO"),
    ("ie", "IY"),
    ("ei", "EY"),
    ("ey", "IY"),
    ("er", "ER"),
    ("ir", "ER"),
    ("ur", "ER"),
    ("ar", "AA R"),
    ("or", "AO R"),
    ("a", "AE"),
    ("b", "B"),
    ("c", "K"),
    ("d", "D"),
    ("e", "EH"),
    ("f", "F"),
    ("g", "G"),
    ("h", "HH"),
    ("i", "IH"),
    ("j", "JH"),
    ("k", "K"),
    ("l", "L"),
    ("m", "M"),
    ("n", "N"),
    ("o", "AA"),
    ("p", "P"),
    ("q", "K"),
    ("r", "R"),
    ("s", "S"),
    ("t", "T"),
    ("u", "AH"),
    ("v", "V"),
    ("w", "W"),
    ("x", "K S"),
    ("y", "IY"),
    ("z", "Z"),
]
_LETTER_NAMES = {
    "a": "EY",
    "b": "B IY",
    "c": "S IY",
    "d": "D IY",
    "e": "IY",
    "f": "EH F",
    "g": "JH IY",
    "h": "EY CH",
    "i": "AY",
    "j": "JH EY",
    "k": "K EY",
    "l": "EH L",
    "m": "EH M",
    "n": "EH N",
    "o": "OW",
    "p": "P IY",
    "q": "K Y UW",
    "r": "AA R",
    "s": "EH S",
    "t": "T IY",
    "u": "Y UW",
    "v": "V IY",
    "w": "D AH B AH L Y UW",
    "x": "EH K S",
    "y": "W AY",
    "z": "Z IY",
}


def letter_rules(word: str) -> str:
    """ARPAbet guess for a word from spelling alone."""
    w = re.sub(r"[^a-z]", "", word.lower())
    w = re.sub(r"([bcdfgklmnprstvz])\1", r"\1", w)  # doubled consonants sound once
    if len(w) > 3 and w.endswith("e") and w[-2] not in "aeiou":
        w = w[:-1]  # silent final e
    phones: list[str] = []
    i = 0
    while i < len(w):
        for graph, ph in _G2P:
            if w.startswith(graph, i):
                if graph == "c" and w[i + 1 : i + 2] in ("e", "i", "y"):
                    ph = "S"
                if graph == "y" and i == 0:
                    ph = "Y"
                phones += ph.split()
                i += len(graph)
                break
        else:
            i += 1
    return " ".join(phones) or "AH"


def pronounce(token: str, lookup: callable) -> str:
    """Pronunciation of an out-of-dictionary token: acronyms spelled, compounds split, else letter rules."""
    if len(token) <= 4 and not re.search(r"[aeiouy]", token):
        return " ".join(_LETTER_NAMES[c] for c in token if c in _LETTER_NAMES)
    # "smartwatch" = "smart" + "watch": split into two dictionary words where possible.
    for cut in range(len(token) - 3, 2, -1):
        head, tail = lookup(token[:cut]), lookup(token[cut:])
        if head and tail:
            return f"{head} {tail}"
    # A known stem with a suffix: "vlogs", "upskilling".
    for suffix, phones in (("'s", "Z"), ("s", "Z"), ("ed", "D"), ("ing", "IH NG"), ("er", "ER"), ("ly", "L IY")):
        if token.endswith(suffix) and (stem := lookup(token[: -len(suffix)])):
            return f"{stem} {phones}"
    return letter_rules(token)
