"""Final-answer extraction from a model response (pure string functions, no math-verify).

The grader (``rewards/math.py``) looks for the final answer in this order:

1. the LAST ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched with nesting, so
   ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``;
2. a GSM8K-style ``#### 42`` line;
3. a short single-line response (<= ``SHORT_RESPONSE_CHARS`` characters) is taken as the answer
   itself ("3.0", "p - q", "\\sqrt{51}");
4. otherwise math-verify reads the whole response (``$...$`` anchors, "the answer is");
5. and when that finds nothing, the last number in the text.

Steps 1-3 and 5 are here; step 4 needs math-verify and lives in ``math.py``.
"""

from __future__ import annotations

import re

SHORT_RESPONSE_CHARS = 64

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K_RE = re.compile(r"####\s*([^\n]*)")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` with nested braces matched.

    Returns None when there is no box or the last one is never closed (a truncated response).
    An empty box returns "" (the caller counts it as no answer).
    """
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
        # unclosed: fall back to an earlier, closed box
    return None


def gsm8k_answer(text: str) -> str | None:
    """The text after the last ``####`` (GSM8K's answer marker), thousands separators removed."""
    found = _GSM8K_RE.findall(text)
    if not found:
        return None
    ans = strip_thousands(found[-1].strip().rstrip("."))
    return ans or None


def last_number(text: str) -> str | None:
    """The last number in ``text`` ("1,234.5" -> "1234.5"), or None."""
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    return strip_thousands(found[-1]).rstrip(",") or None


def strip_thousands(s: str) -> str:
    """Remove thousands separators between digit groups: "1,450,000" -> "1450000" ("1,2" is kept)."""
    return _THOUSANDS_RE.sub("", s)


def short_answer(text: str) -> str | None:
    """The whole response when it is short and on one line (a bare answer), else None."""
    s = text.strip().rstrip(".").strip()
    if not s or len(s) > SHORT_RESPONSE_CHARS or "\n" in s:
        return None
    if s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    return s or None


def extract_answer(response: str) -> tuple[str | None, str]:
    """(answer text, how it was found) by steps 1-3 of the module docstring.

    ``how`` is "boxed", "gsm8k", "short" or "none" (then math-verify and the last number get their turn).
    """
    boxed = last_boxed(response)
    if boxed is not None:
        return (boxed or None), "boxed"
    gsm = gsm8k_answer(response)
    if gsm is not None:
        return gsm, "gsm8k"
    short = short_answer(response)
    if short is not None:
        return short, "short"
    return None, "none"


def normalize_gold(gold: str) -> str:
    """A gold answer as a bare string: a GSM8K solution gives its ``####`` answer; a boxed gold is
    unboxed; thousands separators are removed from plain numbers; "27.0" stays "27.0" (math-verify
    compares numbers by value)."""
    gold = str(gold).strip()
    if "####" in gold:
        gold = gsm8k_answer(gold) or ""
    boxed = last_boxed(gold)
    if boxed is not None:
        gold = boxed
    if gold.startswith("$") and gold.endswith("$"):
        gold = gold.strip("$").strip()
    if re.fullmatch(r"-?[\d,]+(?:\.\d+)?", gold):
        gold = strip_thousands(gold)
    return gold
