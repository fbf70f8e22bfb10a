"""What a script says: its whitespace words and the lowercase tokens each is spoken as.

Both aligners read the script through here. Numerals, currencies, percentages, times and
abbreviations are spelled out ("$20" -> "twenty dollars", "3.5%" -> "three point five percent",
"Dr." -> "doctor") with num2words; mixed words ("S2V", "covid-19") split at symbols and
letter/digit changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from num2words import num2words

_ABBREVIATIONS = {
    "dr": "doctor",
    "mr": "mister",
    "mrs": "missus",
    "ms": "miz",
    "prof": "professor",
    "jr": "junior",
    "sr": "senior",
    "st": "saint",
    "vs": "versus",
    "etc": "et cetera",
    "approx": "approximately",
    "e.g": "for example",
    "i.e": "that is",
    "inc": "incorporated",
    "ltd": "limited",
    "dept": "department",
    "mt": "mount",
}
_SYMBOLS = {"&": "and", "+": "plus", "@": "at", "%": "percent", "=": "equals", "#": "number"}
_CURRENCIES = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
}
_PUNCT = "\"'“”‘’()[]{}<>,;:!?¡¿…—–-*_/\\|~^`."


@dataclass
class ScriptWord:
    """One whitespace-separated word of the script and the tokens it is spoken as."""

    text: str
    tokens: list[str] = field(default_factory=list)


def _number_words(num: str) -> list[str]:
    """Digits as spoken: years as years, decimals with "point", ordinals, thousands separators."""
    ordinal = re.fullmatch(r"(\d+)(st|nd|rd|th)", num)
    if ordinal:
        return _split(num2words(int(ordinal.group(1)), to="ordinal"))
    plain = num.replace(",", "")
    if re.fullmatch(r"\d+", plain):
        value = int(plain)
        if "," not in num and len(num) == 4 and 1100 <= value <= 2099 and value % 1000 >= 10:
            return _split(num2words(value, to="year"))
        return _split(num2words(value))
    if re.fullmatch(r"\d*\.\d+", plain):
        whole, frac = plain.split(".")
        return _split(num2words(int(whole or 0))) + ["point"] + [_split(num2words(int(d)))[0] for d in frac]
    return []


def _split(text: str) -> list[str]:
    return [t for t in re.split(r"[\s\-,]+", text.lower()) if t and t != "and"] if text else []


def _expand(raw: str) -> list[str]:
    """Tokens spoken for one script word (may be empty for pure punctuation)."""
    word = raw.strip(_PUNCT.replace(".", "") + ".") if not re.fullmatch(r"[.\d,]+", raw) else raw.strip(".,")
    low = raw.lower().strip(_PUNCT.replace(".", ""))
    # Abbreviations are recognised with their period ("Dr." is not "dr" = drive in the dictionary).
    if low.endswith(".") and low.rstrip(".") in _ABBREVIATIONS:
        return _ABBREVIATIONS[low.rstrip(".")].split()
    if not word:
        return [_SYMBOLS[c] for c in raw if c in _SYMBOLS]
    currency = re.fullmatch(r"([$€£])(\d[\d,]*)(?:\.(\d\d))?([kKmMbB]?)", word)
    if currency:
        sym, whole, cents, scale = currency.groups()
        one, many, cent, cents_name = _CURRENCIES[sym]
        tokens = _number_words(whole)
        tokens += {"k": ["thousand"], "m": ["million"], "b": ["billion"]}.get(scale.lower(), [])
        tokens.append(one if whole == "1" and not scale else many)
        if cents and int(cents):
            tokens += ["and", *_number_words(str(int(cents))), cent if cents == "01" else cents_name]
        return tokens
    percent = re.fullmatch(r"(\d[\d,]*(?:\.\d+)?)%", word)
    if percent:
        return _number_words(percent.group(1)) + ["percent"]
    clock = re.fullmatch(r"(\d{1,2}):(\d\d)", word)
    if clock:
        hours, minutes = int(clock.group(1)), int(clock.group(2))
        tail = [] if minutes == 0 else (["oh"] if minutes < 10 else []) + _split(num2words(minutes))
        return _split(num2words(hours)) + (tail or ["o'clock"])
    if re.fullmatch(r"\d[\d,]*(?:\.\d+)?|\d+(?:st|nd|rd|th)", word):
        return _number_words(word)
    tokens: list[str] = []
    # Mixed words ("S2V", "mp4", "covid-19", "well-known", "AT&T"): split at symbols and letter/digit changes.
    for part in re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+(?:\.\d+)?|[&+@=#%]", word):
        if part[0].isdigit():
            tokens += _number_words(part)
        elif part in _SYMBOLS:
            tokens.append(_SYMBOLS[part])
        else:
            tokens.append(part.lower())
    return tokens


_TYPOGRAPHY = str.maketrans({"’": "'", "‘": "'", "ʼ": "'", "\u00a0": " "})


def normalize_script(script: str) -> list[ScriptWord]:
    """Split a script into words and the dictionary tokens each is spoken as."""
    return [ScriptWord(text=raw, tokens=_expand(raw.translate(_TYPOGRAPHY))) for raw in script.split()]


def spoken_words(script: str) -> list[tuple[str, list[str]]]:
    """Each whitespace word of the script and the lowercase words it is said as."""
    out = []
    for word in normalize_script(script):
        raw = word.text
        if word.tokens and (raw.isascii() or re.search(r"[\d$€£%&+@=#]", raw)):
            out.append((raw, word.tokens))
        else:  # other scripts and accented words keep their own letters
            letters = "".join(c for c in raw.lower() if c.isalpha() or c == "'").strip("'")
            out.append((raw, [letters] if letters else []))
    return out
