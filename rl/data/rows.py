"""The row schema every GRPO data set here produces, and its jsonl reader/writer.

What it does: `make_row(...)` builds one training row:
    {"data_source": str,                  # which task produced the row ("math_lighteval", ...)
     "prompt": [{"role": "user", "content": problem + INSTRUCTION}],   # one-message chat
     "ground_truth": str,                 # the answer the reward compares against
     "level": str, "type": str,           # difficulty and subject, as published
     "split": str,                        # "train" / "test"
     "index": int}                        # row position in the source split (before skips)
`write_jsonl` writes rows one per line (UTF-8, keys in this order, no ASCII escaping, "\\n"
line ends) so that the same rows always give the same bytes; `read_jsonl` reads them back.
What it leaves out: tokenisation and chat templates (the trainer applies the tokenizer's).
What breaks without it: the trainer, the reward and the tests would each guess the schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

INSTRUCTION = " Let's think step by step and output the final answer within \\boxed{}."
ROW_KEYS = ("data_source", "prompt", "ground_truth", "level", "type", "split", "index")


def make_row(*, data_source: str, problem: str, ground_truth: str, level: str, type: str,
             split: str, index: int) -> dict:
    """One row of the schema above; the prompt is `problem + INSTRUCTION` as a user turn."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": problem + INSTRUCTION}],
        "ground_truth": ground_truth,
        "level": level,
        "type": type,
        "split": split,
        "index": index,
    }


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows to `path` (parents created); returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> Iterator[dict]:
    """Rows of a jsonl file; a line that is not JSON is an error naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({exc}); fix or drop that line") from exc
