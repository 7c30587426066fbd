"""The file-to-file copy path of hf2mcore / mcore2hf: row traces checked against the rules on real
data, byte copies against a plain read/write, and whole conversions against the tensor path."""
import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch

from convert.formats import filecopy
from mapping.row_trace import ZERO, row_block, slice_runs, trace_rows
from convert.formats import Piece, Writer
from mapping import rules as R
from tools.make_tiny import cached_tiny

S = R.Shapes(num_query_groups=2, heads_per_group=3, head_dim=4, vocab_size=10, padded_vocab_size=16)
OPS = R.OPS


def assemble(runs, ins, row_shape):
    """The output the runs describe, built from the real inputs (independent of the rule)."""
    parts = [torch.zeros(n, *row_shape, dtype=ins[0].dtype) if src == ZERO else ins[src][row: row + n]
             for src, row, n in runs]
    return torch.cat(parts)


ROW_MOVES = {
    "qkv_to_mcore": (lambda ts: [OPS["qkv"].to_mcore(ts, S)], [(24, 5), (8, 5), (8, 5)]),
    "qkv_bias_to_mcore": (lambda ts: [OPS["qkv"].to_mcore(ts, S)], [(24,), (8,), (8,)]),
    "qkv_to_hf": (lambda ts: OPS["qkv"].to_hf(ts[0], S), [(40, 5)]),
    "gate_up_to_mcore": (lambda ts: [OPS["gate_up"].to_mcore(ts, S)], [(6, 3), (6, 3)]),
    "gate_up_to_hf": (lambda ts: OPS["gate_up"].to_hf(ts[0], S), [(12, 3)]),
    "vocab_pad": (lambda ts: [OPS["vocab"].to_mcore(ts, S)], [(10, 7)]),
    "vocab_unpad": (lambda ts: OPS["vocab"].to_hf(ts[0], S), [(16, 7)]),
    "copy_3d": (lambda ts: [OPS["copy"].to_mcore(ts, S)], [(4, 3, 2)]),
}


@pytest.mark.parametrize("case", sorted(ROW_MOVES))
def test_trace_matches_the_rule_on_real_data(case):
    fn, shapes = ROW_MOVES[case]
    ins = [torch.randn(s) for s in shapes]
    outs = fn(ins)
    runs = trace_rows(fn, shapes, [tuple(o.shape) for o in outs])
    assert runs is not None and len(runs) == len(outs)
    for r, o in zip(runs, outs):
        assert torch.equal(assemble(r, ins, o.shape[1:]), o)


@pytest.mark.parametrize("fn", [
    lambda ts: [ts[0] + 1], lambda ts: [ts[0] * 2], lambda ts: [ts[0].flip(1)],
    lambda ts: [ts[0].T.contiguous()], lambda ts: [ts[0].roll(1, dims=1)],
    lambda ts: [OPS["vocab_shared"].to_mcore(ts, S)],  # compares its inputs' values
], ids=["add", "scale", "flip_columns", "transpose", "roll_columns", "vocab_shared"])
def test_trace_refuses_what_is_not_a_row_move(fn):
    shapes = [(10, 10), (10, 10)]
    ins = [torch.randn(s) for s in shapes]
    assert trace_rows(fn, shapes, [tuple(o.shape) for o in fn([ins[0], ins[0]])]) is None


def test_row_blocks_and_slices():
    assert row_block((8, 4), (4, 1), 32, (16, 4)) == (8, 8)
    assert row_block((16, 2), (4, 1), 0, (16, 4)) is None          # a column block
    assert row_block((4, 4), (1, 4), 0, (4, 4)) is None            # transposed
    assert slice_runs([(0, 0, 10), (ZERO, 0, 6)], 8, 5) == [(0, 8, 2), (ZERO, 0, 3)]


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "fallback"])
def test_copy_ranges_writes_the_bytes_in_order(tmp_path, monkeypatch, kernel):
    if not kernel:
        def refuse(*a):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    src = bytes(range(256)) * 40
    (tmp_path / "src").write_bytes(src)
    s = os.open(tmp_path / "src", os.O_RDONLY)
    d = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT)
    try:
        n = filecopy.copy_ranges(d, 5, [(s, 100, 300), (None, 0, 7), (s, 0, 10)])
        with pytest.raises(filecopy.ShortSourceError):
            filecopy.copy_ranges(d, 0, [(s, len(src) - 4, 8)])
    finally:
        os.close(s)
        os.close(d)
    assert n == 317
    assert (tmp_path / "dst").read_bytes()[5:322] == src[100:400] + bytes(7) + src[:10]


def test_copied_record_is_the_tensor_record(tmp_path):
    """write_copied (torch.save around a hole, filled by a file copy) == write_tensor, byte for byte."""
    t = torch.randn(6, 5).to(torch.bfloat16)
    (tmp_path / "raw").write_bytes(t.view(torch.uint8).numpy().tobytes())
    piece = Piece("k", (2, 6, 5), (1, 0, 0), (1, 6, 5), torch.bfloat16, "p", (6, 5), (5, 1), 0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    wa, wb = Writer(tmp_path / "a"), Writer(tmp_path / "b")
    wa.write_tensor(piece, t.reshape(1, 6, 5))
    fd = os.open(tmp_path / "raw", os.O_RDONLY)
    wb.write_copied(piece, [(fd, 0, 30), (fd, 30, 30)])
    os.close(fd)
    assert wa.close()[0][1].length == wb.close()[0][1].length
    a, b = (tmp_path / "a" / "__0_0.distcp").read_bytes(), (tmp_path / "b" / "__0_0.distcp").read_bytes()
    assert a == b and len(a) < 2 * t.nbytes + 2048


def test_tensor_record_of_a_view_holds_only_the_view(tmp_path):
    """A chunk that is half of a larger tensor must not drag the whole storage into the file."""
    full = torch.randn(12, 5)
    piece = Piece("k", (12, 5), (6, 0), (6, 5), torch.float32, "p", (6, 5), (5, 1), 30)
    w = Writer(tmp_path)
    w.write_tensor(piece, full[6:])
    (_, info), = w.close()
    assert info.length < full[6:].nbytes + 2048


def digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
def test_copy_path_writes_what_the_tensor_path_writes(family, tmp_path, monkeypatch):
    from convert import hf2mcore, mcore2hf
    from convert.formats import byte_ranges as copy_plan

    src = cached_tiny(family, dtype="bf16")
    taken = {"hf": 0, "mcore": 0}

    def counting(fn, key):
        def wrapped(*a):
            r = fn(*a)
            taken[key] += r is not None
            return r
        return wrapped

    monkeypatch.setattr(hf2mcore, "hf_ranges", counting(copy_plan.hf_ranges, "hf"))
    monkeypatch.setattr(mcore2hf, "mcore_ranges", counting(copy_plan.mcore_ranges, "mcore"))
    hf2mcore.run(str(src), str(tmp_path / "m_copy"))
    mcore2hf.run(str(tmp_path / "m_copy"), str(tmp_path / "h_copy"))
    assert taken["hf"] > 0 and taken["mcore"] > 0
    monkeypatch.setattr(hf2mcore, "hf_ranges", lambda *a: None)
    monkeypatch.setattr(mcore2hf, "mcore_ranges", lambda *a: None)
    hf2mcore.run(str(src), str(tmp_path / "m_tensor"))
    mcore2hf.run(str(tmp_path / "m_tensor"), str(tmp_path / "h_tensor"))
    assert digest(tmp_path / "m_copy" / "release") == digest(tmp_path / "m_tensor" / "release")
    # The ownership marker fingerprints its input folder (names, sizes, mtimes in seconds): the
    # two inputs differ in mtime whenever their writes straddle a second, so it is left out.
    from convert.formats import OWNER

    h_copy, h_tensor = digest(tmp_path / "h_copy"), digest(tmp_path / "h_tensor")
    assert h_copy.pop(OWNER) and h_tensor.pop(OWNER)
    assert h_copy == h_tensor


def test_replaced_transform_is_traced_afresh(monkeypatch):
    """The trace cache follows the transform, not its name (validate's tests swap OPS entries)."""
    import dataclasses

    from mapping.row_trace import rule_rows

    rule = R.Rule("decoder.layers.{L}.mlp.linear_fc1.weight",
                  ("model.layers.{L}.mlp.gate_proj.weight", "model.layers.{L}.mlp.up_proj.weight"), op="gate_up")
    args = (S, "to_mcore", ((6, 3), (6, 3)), ((12, 3),))
    assert rule_rows(rule, *args) == [[(0, 0, 6), (1, 0, 6)]]
    swapped = dataclasses.replace(OPS["gate_up"], to_mcore=lambda ts, s: torch.cat(ts[::-1]))
    monkeypatch.setitem(R.OPS, "gate_up", swapped)
    assert rule_rows(rule, *args) == [[(1, 0, 6), (0, 0, 6)]]
