"""Which rows of which input tensors a rule's output is made of, found without reading data.

Most rules only move whole rows (dim 0): ``copy``, ``qkv`` (interleave by query group),
``gate_up`` (concatenate), ``vocab`` (append zero rows) and their inverses. When a rule does,
each output tensor is a list of byte ranges of the input files, and the converter can copy those
ranges file to file (``os.copy_file_range``: one in-kernel copy, no tensor in memory) instead of
reading, transforming and writing tensors.

``trace_rows`` finds out by running the rule on stand-ins: tensors of the inputs' rank, with
``TRACE_WIDTH`` columns in place of the real trailing dims, whose elements are random 62-bit
tags, distinct per (input, row, column). The rule moved rows intact iff every output row holds
the tags of one input row, columns in order, or is all zeros (padding). Arithmetic on values,
element moves inside a row, transposes or anything shape-dependent show up as unknown tags or a
wrong shape, and the rule's own exceptions (e.g. ``vocab_shared``, which compares its inputs'
values) end the trace: in all those cases the answer is ``None`` and the caller takes the
tensor path. Nothing here knows any rule by name.

Shape legend: R = rows of a tensor, W = ``TRACE_WIDTH`` stand-in columns.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

TRACE_WIDTH = 2
ZERO = -1  # input index of a padding (all-zero) run


def _stand_in(rows: int, ndim: int, gen: torch.Generator) -> torch.Tensor:
    shape = (rows,) if ndim == 1 else (rows, TRACE_WIDTH) + (1,) * (ndim - 2)
    n = 1
    for s in shape:
        n *= s
    return torch.randint(1 << 40, 1 << 62, (n,), generator=gen, dtype=torch.int64).reshape(shape)


def trace_rows(fn: Callable[[list], list], in_shapes: list[tuple[int, ...]],
               out_shapes: list[tuple[int, ...]]) -> Optional[list[list[tuple[int, int, int]]]]:
    """Per output: runs ``(input index, first row, row count)`` (input ``ZERO`` = zero rows),
    if ``fn`` (a list of tensors -> a list of tensors) only moves whole rows; else ``None``."""
    if any(len(s) == 0 for s in in_shapes + out_shapes):
        return None
    gen = torch.Generator().manual_seed(0x5EED)
    ins = [_stand_in(s[0], len(s), gen) for s in in_shapes]
    rows_NW = torch.cat([t.reshape(t.shape[0], -1) for t in ins])
    src_N = torch.cat([torch.full((t.shape[0],), i) for i, t in enumerate(ins)])
    row_N = torch.cat([torch.arange(t.shape[0]) for t in ins])
    tags_N, order_N = rows_NW[:, 0].sort()
    if bool((tags_N[1:] == tags_N[:-1]).any()):
        return None  # tag collision (astronomically unlikely): do not guess
    try:
        outs = fn(ins)
    except (RuntimeError, ValueError, IndexError, TypeError):
        return None
    if not isinstance(outs, (list, tuple)) or len(outs) != len(out_shapes):
        return None
    runs = []
    for out, want in zip(outs, out_shapes):
        probe = (want[0],) if len(want) == 1 else (want[0], TRACE_WIDTH) + (1,) * (len(want) - 2)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != probe or out.dtype != torch.int64:
            return None
        found = _lookup(out.reshape(want[0], -1), rows_NW, tags_N, order_N)
        if found is None:
            return None
        runs.append(_runs(torch.where(found < 0, ZERO, src_N[found.clamp(min=0)]),
                          torch.where(found < 0, 0, row_N[found.clamp(min=0)])))
    return runs


def _lookup(out_MW, rows_NW, tags_N, order_N) -> Optional[torch.Tensor]:
    """Index into the stand-in rows of each output row (-1: zero row); None if a row is neither."""
    pos_M = torch.searchsorted(tags_N, out_MW[:, 0].contiguous()).clamp(max=len(tags_N) - 1)
    idx_M = order_N[pos_M]
    intact_M = (rows_NW[idx_M] == out_MW).all(dim=1)
    zero_M = (out_MW == 0).all(dim=1)
    if not bool((intact_M | zero_M).all()):
        return None
    return torch.where(zero_M, -1, idx_M)


def _runs(src_M: torch.Tensor, row_M: torch.Tensor) -> list[tuple[int, int, int]]:
    """Consecutive rows of one input (or zero rows) merged into (input, first row, count)."""
    if len(src_M) == 0:
        return []
    step_M = torch.ones_like(src_M, dtype=torch.bool)
    step_M[1:] = (src_M[1:] != src_M[:-1]) | ((src_M[1:] != ZERO) & (row_M[1:] != row_M[:-1] + 1))
    starts = torch.nonzero(step_M).flatten().tolist() + [len(src_M)]
    return [(int(src_M[a]), int(row_M[a]), b - a) for a, b in zip(starts[:-1], starts[1:])]


def rule_rows(rule, model_shapes, direction: str, in_shapes: tuple, out_shapes: tuple):
    """``trace_rows`` of a mapping rule, ``direction`` "to_mcore" or "to_hf". Cached, since
    models repeat the same (rule, shapes) in every layer and expert; the cache is keyed on the
    rule's current transform itself (``mapping.rules.OPS[rule.op]``), not on its name, so a
    replaced transform is traced afresh. Do not mutate the result."""
    from mapping import rules as R

    return _traced(R.OPS[rule.op], model_shapes, direction, in_shapes, out_shapes)


@functools.lru_cache(maxsize=1024)
def _traced(op, model_shapes, direction: str, in_shapes: tuple, out_shapes: tuple):
    if direction == "to_mcore":
        def fn(ts):
            return [op.to_mcore(ts, model_shapes)]
    else:
        def fn(ts):
            return list(op.to_hf(ts[0], model_shapes))
    return trace_rows(fn, list(in_shapes), list(out_shapes))


def row_block(view_shape, view_stride, view_offset: int, shape) -> Optional[tuple[int, int]]:
    """``(first row, row count)`` if the view (of a contiguous tensor of ``shape``) is a block of
    whole rows, contiguous in memory; else ``None``."""
    shape, view_shape, view_stride = tuple(shape), tuple(view_shape), tuple(view_stride)
    if not shape or view_shape[1:] != shape[1:]:
        return None
    want, step = [], 1
    for s in reversed(view_shape):
        want.append(step)
        step *= s
    if any(a != b for a, b, s in zip(view_stride, reversed(want), view_shape) if s > 1):
        return None
    row = step // view_shape[0] if view_shape[0] else 1
    if view_offset % row:
        return None
    return view_offset // row, view_shape[0]


def slice_runs(runs, first: int, count: int) -> list[tuple[int, int, int]]:
    """The runs covering output rows ``[first, first + count)``."""
    out, pos, end = [], 0, first + count
    for src, row, n in runs:
        lo, hi = max(pos, first), min(pos + n, end)
        if lo < hi:
            out.append((src, row + (lo - pos) if src != ZERO else 0, hi - lo))
        pos += n
    return out
