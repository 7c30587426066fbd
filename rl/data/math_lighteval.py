"""Preprocess MATH-lighteval (a parquet mirror of Hendrycks' MATH) into GRPO rows.

    python -m rl.data.math_lighteval --input-dir DIR --out-dir OUT

What it does: finds the `default` config's files under DIR (`DIR/data/{split}-*.parquet`,
`DIR/default/{split}/*.parquet`, or `{split}*.parquet|jsonl` directly in DIR), reads the
columns `problem`, `level`, `type`, `solution`, and writes `OUT/{split}.jsonl` in the schema of
rl.data.rows: prompt = problem + the boxed-answer instruction as a one-message chat,
ground_truth = content of the solution's last `\\boxed{}` (or `\\fbox{}`), index = position of
the row in its source split. Rows whose solution has no box are counted and skipped, never
guessed. Prints one summary line per split and a total.
What it leaves out: the per-subject configs (`DIR/algebra/...`, ...): they repeat the default
rows split by subject, so reading them as well would duplicate every problem; they are never
read. Downloading: point it at a local copy.
What breaks without it: the trainer has no MATH prompts and ground truths.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Iterator

from rl.data.rows import make_row, read_jsonl, write_jsonl
from rl.reward.extract import last_boxed

DATA_SOURCE = "math_lighteval"
COLUMNS = ("problem", "level", "type", "solution")
KNOWN_SPLITS = ("train", "validation", "test")
DEFAULT_CONFIG_ROOTS = ("data", "default", ".")
SUFFIXES = (".parquet", ".jsonl")


def _split_files_in(root: Path, split: str) -> list[Path]:
    found: set[Path] = set()
    for suffix in SUFFIXES:
        for pattern in (f"{split}{suffix}", f"{split}-*{suffix}", f"{split}/*{suffix}"):
            found.update(p for p in root.glob(pattern) if p.is_file())
    kinds = {p.suffix for p in found}
    if len(kinds) > 1:
        raise ValueError(
            f"{root}: split {split!r} has both parquet and jsonl files ({sorted(map(str, found))}); "
            "keep one format per split"
        )
    return sorted(found)


def find_split_files(input_dir: Path) -> dict[str, list[Path]]:
    """Files of each split of the default config: the first of DIR/data, DIR/default, DIR
    that holds any split file wins; subject folders are never searched."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input-dir {input_dir} is not a directory; pass the data set's root folder")
    for name in DEFAULT_CONFIG_ROOTS:
        root = input_dir / name
        if not root.is_dir():
            continue
        splits = {s: files for s in KNOWN_SPLITS if (files := _split_files_in(root, s))}
        if splits:
            return splits
    subdirs = sorted(p.name for p in input_dir.iterdir() if p.is_dir())
    raise FileNotFoundError(
        f"no default-config split files under {input_dir}: expected data/train-*.parquet, "
        f"default/train/*.parquet or train*.parquet|jsonl (splits {KNOWN_SPLITS}); found folders "
        f"{subdirs}. Per-subject folders are not read: point --input-dir at the data set root "
        "that holds the default config."
    )


def _read_parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (has {names}); expected MATH columns {list(COLUMNS)}")
    yield from pq.read_table(path, columns=list(COLUMNS)).to_pylist()


def _read_jsonl_source(path: Path) -> Iterator[dict]:
    for lineno, row in enumerate(read_jsonl(path), 1):
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise ValueError(f"{path}: row {lineno} lacks {missing}; expected MATH columns {list(COLUMNS)}")
        yield row


def read_source_rows(files: list[Path]) -> Iterator[dict]:
    """MATH rows (problem, level, type, solution) from parquet or jsonl files, in file order."""
    for path in files:
        reader = _read_parquet if path.suffix == ".parquet" else _read_jsonl_source
        yield from reader(path)


def preprocess_rows(source_rows, split: str, data_source: str = DATA_SOURCE) -> tuple[list[dict], int]:
    """(GRPO rows, number skipped because the solution has no box) for one split."""
    rows, skipped = [], 0
    for index, src in enumerate(source_rows):
        answer = last_boxed(src["solution"])
        if answer is None:
            skipped += 1
            continue
        rows.append(make_row(data_source=data_source, problem=src["problem"], ground_truth=answer,
                             level=src["level"], type=src["type"], split=split, index=index))
    return rows, skipped


def preprocess_dir(input_dir: Path, out_dir: Path) -> dict[str, tuple[int, int]]:
    """Preprocess every split found under `input_dir`; returns {split: (written, skipped)}."""
    result = {}
    for split, files in find_split_files(input_dir).items():
        rows, skipped = preprocess_rows(read_source_rows(files), split)
        written = write_jsonl(Path(out_dir) / f"{split}.jsonl", rows)
        result[split] = (written, skipped)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m rl.data.math_lighteval",
        description="Turn a local MATH-lighteval copy (default config, parquet or jsonl) into "
        "GRPO jsonl rows: OUT/train.jsonl, OUT/test.jsonl.",
    )
    ap.add_argument("--input-dir", type=Path, required=True,
                    help="data set root holding data/train-*.parquet (or default/, or train*.jsonl)")
    ap.add_argument("--out-dir", type=Path, required=True, help="where {split}.jsonl are written")
    args = ap.parse_args(argv)
    start = time.monotonic()
    result = preprocess_dir(args.input_dir, args.out_dir)
    for split, (written, skipped) in result.items():
        print(f"{split}: {written} rows -> {args.out_dir / (split + '.jsonl')} "
              f"({skipped} skipped: solution without \\boxed{{}})")
    total = sum(w for w, _ in result.values())
    print(f"wrote {total} rows in {len(result)} splits to {args.out_dir} in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
