"""Find the final answer of a response: the content of its last `\\boxed{...}` or `\\fbox{...}`.

What it does: scans backwards for the last box command and returns the text between its
braces, matching nested braces (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`). The brace-less form
`\\boxed 5` (as in `$\\boxed 5$`) is accepted and ends at the first space, `$` or end of text.
What it leaves out: any other answer format ("The answer is 5", `####`): a response without a
box has no answer. If the last box is not closed, the answer is missing (None) rather than
an earlier box: the model's final word is malformed, so it is not rewarded.
What breaks without it: the reward and the MATH preprocessing (ground truth = last box of the
published solution) share this one definition of "the final answer".

Cost is linear in the text length, with no recursion, so a 1 MB response or 10,000 nested
braces are handled in milliseconds.
"""

from __future__ import annotations

BOX_COMMANDS = ("\\boxed", "\\fbox")


def _last_box_start(text: str) -> tuple[int, str] | None:
    """Position and command of the last box command that is not a prefix of a longer
    command (e.g. `\\boxedfoo` is not a box). Each command's search only moves left, so the
    total cost stays linear even for text full of near-misses."""
    last = {cmd: text.rfind(cmd) for cmd in BOX_COMMANDS}
    while True:
        cmd = max(last, key=last.__getitem__)
        pos = last[cmd]
        if pos < 0:
            return None
        after = pos + len(cmd)
        if after >= len(text) or not text[after].isalpha():
            return pos, cmd
        last[cmd] = text.rfind(cmd, 0, pos)


def _braced_content(text: str, open_pos: int) -> str | None:
    """Content of the `{...}` group opening at `open_pos`, or None if it is never closed.
    Escaped braces `\\{` `\\}` count as text, not as grouping."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{}` / `\\fbox{}` in `text`, or None when there is none or
    when the last one is malformed (unclosed brace, empty brace-less form)."""
    found = _last_box_start(text)
    if found is None:
        return None
    pos, cmd = found
    i = pos + len(cmd)
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        return _braced_content(text, i)
    # Brace-less form: `\boxed 5` -- the argument runs to the next space or `$`.
    j = i
    while j < len(text) and text[j] not in " $\n":
        j += 1
    return text[i:j] if j > i else None
