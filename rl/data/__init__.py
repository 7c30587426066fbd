"""GRPO data sets: every builder writes `{split}.jsonl` rows of one schema (rl.data.rows).

Modules and entry points:
  - `rows`: the schema (`make_row`, `INSTRUCTION`), `write_jsonl`, `read_jsonl`;
  - `math_lighteval`: `python -m rl.data.math_lighteval --input-dir DIR --out-dir OUT`
    (`preprocess_dir`, `find_split_files`, `preprocess_rows`);
  - `synthetic`: `python -m rl.data.synthetic --out-dir OUT` (`ArithConfig`, `make_splits`);
  - `fixtures/`: a 32-row MATH-style fixture (parquet and jsonl) and its expected output.
"""

from rl.data.rows import INSTRUCTION, ROW_KEYS, make_row, read_jsonl, write_jsonl

__all__ = ["INSTRUCTION", "ROW_KEYS", "make_row", "read_jsonl", "write_jsonl"]
