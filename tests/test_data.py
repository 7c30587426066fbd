"""Tests of rl.data: byte-for-byte preprocessing of the shipped fixture, layouts, skipped rows,
and the synthetic task's determinism, disjoint splits and correct answers."""

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rl.data import INSTRUCTION, ROW_KEYS, read_jsonl
from rl.data import math_lighteval as ml
from rl.data import synthetic
from rl.reward import compute_score

FIX = Path(__file__).resolve().parents[1] / "rl" / "data" / "fixtures"
PARQUET_DIR = FIX / "math_lighteval"
JSONL_DIR = FIX / "math_lighteval_jsonl"
EXPECTED = FIX / "expected"


@pytest.mark.parametrize("input_dir", [PARQUET_DIR, JSONL_DIR], ids=["parquet", "jsonl"])
def test_fixture_preprocessing_is_byte_for_byte(tmp_path, input_dir, capsys):
    ml.main(["--input-dir", str(input_dir), "--out-dir", str(tmp_path)])
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (EXPECTED / f"{split}.jsonl").read_bytes(), split
    out = capsys.readouterr().out
    assert "train: 22 rows" in out and "(2 skipped" in out and "test: 7 rows" in out and "(1 skipped" in out
    assert "wrote 29 rows in 2 splits" in out


def test_rows_without_a_box_are_counted_and_skipped(tmp_path):
    assert ml.preprocess_dir(PARQUET_DIR, tmp_path) == {"train": (22, 2), "test": (7, 1)}
    train = list(read_jsonl(tmp_path / "train.jsonl"))
    indices = [r["index"] for r in train]
    assert 20 not in indices and 22 not in indices and indices == sorted(indices)  # the box-less rows


def test_expected_rows_checked_by_hand():
    # Independent of the code: the ground truths read off the fixture solutions by a person.
    gts = [r["ground_truth"] for r in read_jsonl(EXPECTED / "train.jsonl")]
    assert gts == ["19", "7", "\\frac{3}{4}", "720", "24", "2", "5", "\\frac{1}{4}", "17", "(2,3)",
                   "\\dfrac{3}{8}", "\\sqrt{3}", "17", "\\begin{pmatrix} 11 \\\\ 4 \\end{pmatrix}",
                   "$\\sqrt{3}$", "\\text{(B)}", "\\text{point}", "13", "54", "4", "75", "10"]
    src = [json.loads(line) for line in (JSONL_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    first = next(read_jsonl(EXPECTED / "train.jsonl"))
    assert list(first) == list(ROW_KEYS)
    assert first["prompt"] == [{"role": "user", "content": src[0]["problem"] + INSTRUCTION}]
    assert INSTRUCTION == " Let's think step by step and output the final answer within \\boxed{}."
    assert "÷" in (EXPECTED / "train.jsonl").read_text(encoding="utf-8")  # written as is, not escaped


def test_reward_accepts_every_fixture_ground_truth_in_a_box():
    for split in ("train", "test"):
        for row in read_jsonl(EXPECTED / f"{split}.jsonl"):
            assert compute_score(f"So \\boxed{{{row['ground_truth']}}}.", row["ground_truth"]) == 1.0


def test_subject_folders_are_never_read(tmp_path):
    root = tmp_path / "MATH-lighteval"
    shutil.copytree(PARQUET_DIR, root)
    (root / "algebra").mkdir()
    shutil.copy(PARQUET_DIR / "data" / "train-00000-of-00001.parquet", root / "algebra" / "train-00000-of-00001.parquet")
    assert ml.preprocess_dir(root, tmp_path / "out") == {"train": (22, 2), "test": (7, 1)}
    # only subject folders: an error that says why, never a silent read
    shutil.rmtree(root / "data")
    with pytest.raises(FileNotFoundError, match="Per-subject folders are not read"):
        ml.find_split_files(root)


def test_parquet_converter_layout_and_shards(tmp_path):
    # default/{split}/NNNN.parquet, with the train split in two shards read in name order
    rows = pq.read_table(PARQUET_DIR / "data" / "train-00000-of-00001.parquet").to_pylist()
    (tmp_path / "default" / "train").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:10]), tmp_path / "default" / "train" / "0000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:]), tmp_path / "default" / "train" / "0001.parquet")
    assert ml.preprocess_dir(tmp_path, tmp_path / "out") == {"train": (22, 2)}
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == (EXPECTED / "train.jsonl").read_bytes()


def test_missing_column_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "data").mkdir()
    bad = tmp_path / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "solution": "\\boxed{1}"}]), bad)
    with pytest.raises(ValueError, match=r"train-00000-of-00001.parquet: missing columns \['level', 'type'\]"):
        ml.preprocess_dir(tmp_path, tmp_path / "out")


# -- synthetic ------------------------------------------------------------------------------------
def _write(tmp_path, name, *args):
    out = tmp_path / name
    synthetic.main(["--out-dir", str(out), *args])
    return {s: (out / f"{s}.jsonl").read_bytes() for s in ("train", "test")}


def test_synthetic_is_deterministic_by_seed(tmp_path):
    a = _write(tmp_path, "a", "--n-train", "200", "--n-test", "50", "--seed", "3")
    b = _write(tmp_path, "b", "--n-train", "200", "--n-test", "50", "--seed", "3")
    c = _write(tmp_path, "c", "--n-train", "200", "--n-test", "50", "--seed", "4")
    assert a == b and a["train"] != c["train"] and a["test"] != c["test"]


def test_synthetic_test_split_does_not_depend_on_train_size(tmp_path):
    a = _write(tmp_path, "a", "--n-train", "50", "--n-test", "30")
    b = _write(tmp_path, "b", "--n-train", "300", "--n-test", "30")
    assert a["test"] == b["test"]


def test_synthetic_rows_are_correct_disjoint_and_in_schema():
    splits = synthetic.make_splits(synthetic.ArithConfig(n_train=300, n_test=60, seed=0, min_digits=1, max_digits=4))
    problems = {s: [r["prompt"][0]["content"] for r in rows] for s, rows in splits.items()}
    assert len(splits["train"]) == 300 and len(splits["test"]) == 60
    assert not set(problems["train"]) & set(problems["test"])
    assert len(set(problems["train"])) == 300
    pattern = re.compile(r"Compute \$(\d+) (\+|-|\\times) (\d+)\$\." + re.escape(INSTRUCTION))
    evaluate = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "\\times": lambda a, b: a * b}
    for split, rows in splits.items():
        for i, row in enumerate(rows):
            assert list(row) == list(ROW_KEYS) and row["split"] == split and row["index"] == i
            a, op, b = pattern.fullmatch(row["prompt"][0]["content"]).groups()
            assert row["ground_truth"] == str(evaluate[op](int(a), int(b)))
            assert row["level"] == f"Level {max(len(a), len(b))}"
            assert compute_score(f"\\boxed{{{row['ground_truth']}}}", row["ground_truth"]) == 1.0


def test_synthetic_config_errors():
    with pytest.raises(ValueError, match="ops"):
        synthetic.ArithConfig(ops="/")
    with pytest.raises(ValueError, match="too few distinct problems"):
        synthetic.make_splits(synthetic.ArithConfig(n_train=500, n_test=10, min_digits=1, max_digits=1, ops="+"))
