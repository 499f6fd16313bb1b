"""Final-answer extraction from a model response (pure string functions, no math-verify).

The grader (``rewards/math.py``) looks for the final answer in this order:

0. a response that ends inside an unclosed ``\\boxed{`` (cut off at max_new_tokens while writing
   its answer) has NO answer, whatever else it holds: a truncated response must not earn reward
   (issue 15: ``"... = \\boxed{4"`` scored 1.0 against 4 through the short-answer path). This is
   decided here, before math-verify sees the response, because math-verify 0.9.0 is not strict: its
   plain-box pattern ``\\boxed{.+}`` runs to the last ``}`` anywhere, so ``parse`` gives 1 for
   ``"x = \\boxed{\\sqrt{2} + 1"`` and 4 for ``"\\boxed{4} then \\boxed{5"`` (only a lone
   ``"\\boxed{4"`` gives nothing);
1. the LAST ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched with nesting, so
   ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``;
2. a GSM8K-style ``#### 42`` line;
3. a short single-line response (<= ``SHORT_RESPONSE_CHARS`` characters) is taken as the answer
   itself ("3.0", "p - q", "\\sqrt{51}");
4. otherwise math-verify reads the whole response (``$...$`` anchors, "the answer is");
5. and when that finds nothing, the last number in the text.

Steps 0-3 and 5 are here; step 4 needs math-verify and lives in ``math.py``. Every function here
is linear in the text's length (a response of 10,000 nested ``\\boxed{`` took 28 s of CPU in the old
quadratic box scan, outside any deadline; issue 15), so extraction cannot outlast the grader's deadline.

``normalize_unicode`` runs first on both response and gold: decimal digits of any script (fullwidth
"４", Arabic-Indic "٤") become ASCII and the fullwidth forms block (U+FF01-U+FF5E: "＝", "－", "．")
its ASCII twin. Not full NFKC: NFKC turns the superscript in "10²" into "102" (a false match with
gold 102) and "x²" into "x2".
"""

from __future__ import annotations

import re
import unicodedata

SHORT_RESPONSE_CHARS = 64

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K_RE = re.compile(r"####\s*([^\n]*)")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_BRACE_RE = re.compile(r"[{}]")
_UNICODE_TO_ASCII_RE = re.compile(r"[\uff01-\uff5e]|(?![0-9])\d")   # fullwidth forms; non-ASCII decimal digits


def normalize_unicode(text: str) -> str:
    """Non-ASCII decimal digits (any script, ``str.isdecimal``) -> ASCII digits, and the fullwidth
    forms U+FF01-U+FF5E -> their ASCII characters (NFKC of that block); everything else is kept.
    "４２" -> "42", "٤٢" -> "42", "３．５" -> "3.5", "10²" unchanged (see the module docstring)."""
    if text.isascii():
        return text
    return _UNICODE_TO_ASCII_RE.sub(_to_ascii, text)


def _to_ascii(m: re.Match) -> str:
    c = m.group()
    d = unicodedata.decimal(c, None)
    return str(d) if d is not None else unicodedata.normalize("NFKC", c)


def boxed_answer(text: str) -> tuple[str | None, bool]:
    """(content of the last closed ``\\boxed{...}`` / ``\\fbox{...}``, ends_open) in one linear pass.

    ``ends_open`` is True when some box is never closed: the text ends inside it (a truncated
    response); the content is then None, never an earlier box's. "Last" is the last box to open among
    the closed ones, so ``\\boxed{\\boxed{4}}`` gives "4". Braces are matched with a stack over the
    brace characters only; a ``}`` with nothing open is ignored. An empty box gives ("", False).
    """
    starts = {m.end() - 1 for m in _BOXED_RE.finditer(text)}   # the position of each box's "{"
    if not starts:
        return None, False
    stack: list[int] = []    # positions of the "{" not closed yet
    last: tuple[int, int] | None = None
    for m in _BRACE_RE.finditer(text, min(starts)):
        i = m.start()
        if text[i] == "{":
            stack.append(i)
        elif stack:
            o = stack.pop()
            if o in starts and (last is None or o > last[0]):
                last = (o, i)
    if any(o in starts for o in stack):
        return None, True
    return (text[last[0] + 1:last[1]].strip() if last else None), False


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` with nested braces matched.

    Returns None when there is no box or a box is never closed (a truncated response: no answer,
    even when an earlier box is closed). An empty box returns "" (the caller counts it as no answer).
    """
    return boxed_answer(text)[0]


def braces_balanced(text: str) -> bool:
    """True when every ``{`` has its ``}`` after it and no ``}`` comes without one (linear)."""
    depth = 0
    for m in _BRACE_RE.finditer(text):
        depth += 1 if m.group() == "{" else -1
        if depth < 0:
            return False
    return depth == 0


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
    """(answer text, how it was found) by steps 0-3 of the module docstring.

    ``how`` is "unclosed" (a box never closed: no answer, no later step may find one), "boxed",
    "gsm8k", "short" or "none" (then math-verify and the last number get their turn).
    """
    boxed, ends_open = boxed_answer(response)
    if ends_open:
        return None, "unclosed"
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
    compares numbers by value). A gold ending inside an unclosed box gives "" (a bad gold)."""
    gold = str(gold).strip()
    if "####" in gold:
        gold = gsm8k_answer(gold) or ""
    boxed, ends_open = boxed_answer(gold)
    if ends_open:
        return ""
    if boxed is not None:
        gold = boxed
    if gold.startswith("$") and gold.endswith("$"):
        gold = gold.strip("$").strip()
    if re.fullmatch(r"-?[\d,]+(?:\.\d+)?", gold):
        gold = strip_thousands(gold)
    return gold
