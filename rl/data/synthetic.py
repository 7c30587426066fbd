"""A synthetic verifiable task for CPU-sized models: multi-digit arithmetic with boxed answers.

    python -m rl.data.synthetic --out-dir OUT [--n-train 2000 --n-test 200 --seed 0 ...]

What it does: draws problems "Compute $a op b$." (op in +, -, x) with operands of
`min_digits`..`max_digits` digits, and writes `OUT/train.jsonl` and `OUT/test.jsonl` in the
row schema of rl.data.rows (ground_truth = the exact integer result, level = "Level d" with d
the digit count of the larger operand, type = "Arithmetic"). The same config always gives the
same bytes. Train and test are disjoint: a stable hash of (seed, problem) decides which split
a problem may enter, so the test set does not change when `n_train` does.
What it leaves out: word problems, division (non-integer answers), curricula.
What breaks without it: a tiny model cannot learn MATH on a CPU; the demo and the trainer's
end-to-end tests need a task whose reward rises within minutes.
"""

from __future__ import annotations

import argparse
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from rl.data.rows import make_row, write_jsonl

DATA_SOURCE = "synthetic_arith"
OPS = {"+": (lambda a, b: a + b, "+"), "-": (lambda a, b: a - b, "-"), "*": (lambda a, b: a * b, "\\times")}


@dataclass(frozen=True)
class ArithConfig:
    n_train: int = 2000
    """rows in train.jsonl"""
    n_test: int = 200
    """rows in test.jsonl"""
    seed: int = 0
    """the only source of randomness"""
    min_digits: int = 2
    """fewest digits of an operand"""
    max_digits: int = 3
    """most digits of an operand"""
    ops: str = "+-*"
    """operators to draw from, any of '+', '-', '*'"""
    test_percent: int = 10
    """share (in %) of the problem space reserved for the test split"""

    def __post_init__(self):
        bad = set(self.ops) - set(OPS)
        if bad or not self.ops:
            raise ValueError(f"ArithConfig.ops={self.ops!r}: use a non-empty subset of {''.join(OPS)}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if not 0 < self.test_percent < 100:
            raise ValueError(f"test_percent must be in 1..99, got {self.test_percent}")


def _split_of(seed: int, key: str, test_percent: int) -> str:
    return "test" if zlib.crc32(f"{seed}:{key}".encode()) % 100 < test_percent else "train"


def _draw(rng: random.Random, cfg: ArithConfig) -> tuple[int, str, int]:
    def operand() -> int:
        d = rng.randint(cfg.min_digits, cfg.max_digits)
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)

    return operand(), rng.choice(cfg.ops), operand()


def make_splits(cfg: ArithConfig) -> dict[str, list[dict]]:
    """{"train": rows, "test": rows}, deterministic in `cfg`, with no problem in both."""
    want = {"train": cfg.n_train, "test": cfg.n_test}
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    seen: set[str] = set()
    rng = random.Random(cfg.seed)
    attempts, max_attempts = 0, 50 * (cfg.n_train + cfg.n_test) + 1000
    while any(len(rows[s]) < want[s] for s in want):
        attempts += 1
        if attempts > max_attempts:
            got = {s: len(r) for s, r in rows.items()}
            raise ValueError(f"{cfg} has too few distinct problems for {want} (got {got}); "
                             "allow more digits or operators, or ask for fewer rows")
        a, op, b = _draw(rng, cfg)
        key = f"{a}{op}{b}"
        split = _split_of(cfg.seed, key, cfg.test_percent)
        if key in seen or len(rows[split]) >= want[split]:
            continue
        seen.add(key)
        fn, tex = OPS[op]
        level = f"Level {max(len(str(a)), len(str(b)))}"
        rows[split].append(make_row(
            data_source=DATA_SOURCE, problem=f"Compute ${a} {tex} {b}$.", ground_truth=str(fn(a, b)),
            level=level, type="Arithmetic", split=split, index=len(rows[split])))
    return rows


def main(argv: list[str] | None = None) -> None:
    d = ArithConfig()
    ap = argparse.ArgumentParser(prog="python -m rl.data.synthetic",
                                 description="Write a deterministic arithmetic task (train.jsonl, test.jsonl) "
                                 "with \\boxed{} answers for small-model GRPO runs.")
    ap.add_argument("--out-dir", type=Path, required=True, help="where train.jsonl and test.jsonl are written")
    ap.add_argument("--n-train", type=int, default=d.n_train, help="train rows (default %(default)s)")
    ap.add_argument("--n-test", type=int, default=d.n_test, help="test rows (default %(default)s)")
    ap.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    ap.add_argument("--min-digits", type=int, default=d.min_digits, help="fewest operand digits (default %(default)s)")
    ap.add_argument("--max-digits", type=int, default=d.max_digits, help="most operand digits (default %(default)s)")
    ap.add_argument("--ops", default=d.ops, help="operators among + - * (default %(default)s)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    cfg = ArithConfig(n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                      min_digits=args.min_digits, max_digits=args.max_digits, ops=args.ops)
    for split, rows in make_splits(cfg).items():
        write_jsonl(args.out_dir / f"{split}.jsonl", rows)
    print(f"wrote {cfg.n_train} train + {cfg.n_test} test rows to {args.out_dir} "
          f"in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
