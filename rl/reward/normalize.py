"""Normalise a final answer so that equal answers written differently compare equal as strings.

What it does: `normalize_answer(s)` applies the rules Hendrycks et al. published with the MATH
benchmark (NeurIPS 2021 datasets track, "Measuring Mathematical Problem Solving With the MATH
Dataset"), re-implemented here from their description, then a few documented extensions.
`is_equiv(a, b)` compares two normalised answers.

Published rules, in order:
  1. drop line breaks and `\\!` (negative thin space);
  2. `\\\\` -> `\\`; `\\tfrac`, `\\dfrac` -> `\\frac`; drop `\\left`, `\\right`;
  3. drop degrees (`^{\\circ}`, `^\\circ`), dollar signs, units after `\\text{ ` on the right,
     and percent signs;
  4. add the missing zero of a leading decimal point (`.5` -> `0.5`, `{.5` -> `{0.5`);
  5. a short variable prefix goes: `x = 5` -> `5` (only when the left side is <= 2 chars);
  6. `\\sqrt2` -> `\\sqrt{2}`; drop all spaces; `\\frac12` / `\\frac1b` -> `\\frac{1}{2}` ...;
  7. `0.5` -> `\\frac{1}{2}`; a plain integer ratio `a/b` -> `\\frac{a}{b}`.
Extensions (each keeps the rule "equal after normalising" conservative):
  - `\\displaystyle`, `\\,` `\\;` `\\:` spacing, the degree sign, and `\\%` / `%` go;
  - a whole answer wrapped in `\\text{}`, `\\textbf{}`, `\\mathrm{}`, `\\mbox{}` is unwrapped, and
    a trailing unit in such a wrapper after a number is dropped (`5\\text{cm}` -> `5`);
  - `1,000` -> `1000` when the whole answer is one number with thousands separators;
  - a multiple-choice letter in parentheses `(C)` -> `C`;
  - `bmatrix` -> `pmatrix`.
What it leaves out: algebraic equivalence (`0.25` vs `\\frac14`, `2x` vs `x+x`): that is the
symbolic checker's job (rl.reward.symbolic). Every rule is linear-time string work.
What breaks without it: string equality alone rejects most correct MATH answers.
"""

from __future__ import annotations

import re

_WRAPPERS = ("\\text", "\\textbf", "\\mathrm", "\\mbox")
_SPACING = ("\\displaystyle", "\\,", "\\;", "\\:")
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")
_INT = re.compile(r"-?\d+")
_CHOICE = re.compile(r"\(([A-Z])\)")


def _replace_all(s: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        s = s.replace(old, new)
    return s


def _unwrap_whole(s: str) -> str:
    """`\\text{Monday}` -> `Monday` when one wrapper spans the whole answer."""
    for cmd in _WRAPPERS:
        head = cmd + "{"
        if s.startswith(head) and s.endswith("}") and s.count("{") == 1 and s.count("}") == 1:
            return s[len(head) : -1]
    return s


def _drop_right_units(s: str) -> str:
    """Published rule: `5 \\text{ cm}` -> `5 ` (split at `\\text{ ` when it occurs once).
    Extension: a trailing `\\text{...}`/`\\mbox{...}` without braces inside, after something
    ending in a digit or `}`, is also a unit (`5\\text{cm}`, `\\frac{1}{2}\\mbox{ m}`)."""
    parts = s.split("\\text{ ")
    if len(parts) == 2:
        return parts[0]
    for cmd in ("\\text{", "\\mbox{"):
        pos = s.rfind(cmd)
        if pos > 0 and s.endswith("}") and "{" not in s[pos + len(cmd) :]:
            head = s[:pos].rstrip()
            if head and (head[-1].isdigit() or head[-1] == "}"):
                return head
    return s


def _fix_sqrt(s: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}`: a one-character argument without braces gets braces."""
    pieces = s.split("\\sqrt")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if piece and piece[0] not in "{[":
            piece = "{" + piece[0] + "}" + piece[1:]
        out.append(piece)
    return "\\sqrt".join(out)


def _fix_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{b}` -> `\\frac{1}{b}`, `\\frac{a}2` -> `\\frac{a}{2}`.
    A `\\frac` followed by fewer than two characters is left as is (malformed)."""
    pieces = s.split("\\frac")
    out = [pieces[0]]
    for piece in pieces[1:]:
        out.append(_brace_frac_args(piece))
    return "\\frac".join(out)


def _brace_frac_args(piece: str) -> str:
    if not piece or piece[0] == "{":
        # First argument already braced; a bare single-char second argument gets braces.
        close = _matching_close(piece) if piece else -1
        if close < 0 or close + 1 >= len(piece) or piece[close + 1] == "{":
            return piece
        nxt = close + 1
        return piece[: nxt] + "{" + piece[nxt] + "}" + piece[nxt + 1 :]
    if len(piece) < 2:
        return piece
    first, rest = piece[0], piece[1:]
    if rest[0] == "{":
        return "{" + first + "}" + rest
    return "{" + first + "}{" + rest[0] + "}" + rest[1:]


def _matching_close(piece: str) -> int:
    """Index of the brace closing the group that opens at piece[0], or -1."""
    depth = 0
    for i, ch in enumerate(piece):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _fix_slash(s: str) -> str:
    """Published rule: a plain integer ratio `a/b` -> `\\frac{a}{b}`."""
    parts = s.split("/")
    if len(parts) == 2 and _INT.fullmatch(parts[0]) and _INT.fullmatch(parts[1]):
        if not parts[1].startswith("-"):
            return "\\frac{" + parts[0] + "}{" + parts[1] + "}"
    return s


def _drop_short_prefix(s: str) -> str:
    """Published rule: `x = 5` -> `5`, `k=3` -> `3`: one `=` with a left side of <= 2 chars."""
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:
        return parts[1]
    return s


def _leading_zero(s: str) -> str:
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if s.startswith("-."):
        s = "-0" + s[1:]
    return s


def normalize_answer(answer: str) -> str:
    """Normalised form of one final answer (see the module docstring for the rules)."""
    s = answer.replace("\n", "").replace("\\!", "")
    s = _replace_all(s, (("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac")))
    s = _replace_all(s, (("\\left", ""), ("\\right", "")))
    s = _replace_all(s, tuple((sp, "") for sp in _SPACING))
    s = _replace_all(s, (("^{\\circ}", ""), ("^\\circ", ""), ("°", "")))
    s = s.replace("\\$", "").replace("$", "")
    s = _drop_right_units(s.strip())
    s = s.replace("\\%", "").replace("%", "")
    s = _unwrap_whole(s.strip())
    s = _leading_zero(s)
    if not s:
        return s
    s = _drop_short_prefix(s)
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_slash(s)
    return _extensions_after(s)


def _extensions_after(s: str) -> str:
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    choice = _CHOICE.fullmatch(s)
    if choice:
        s = choice.group(1)
    return s.replace("bmatrix", "pmatrix")


def is_equiv(answer: str, ground_truth: str) -> bool:
    """True when both answers are equal after `normalize_answer`."""
    return normalize_answer(answer) == normalize_answer(ground_truth)
