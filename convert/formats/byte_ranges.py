"""Byte ranges a converted tensor is made of, for file-to-file copies (``convert.formats.filecopy``).

When a rule only moves whole rows (``mapping.row_trace``) and the dtype does not change, every
chunk hf2mcore writes is a list of byte ranges of the HF shards, and every HF tensor mcore2hf
writes is a list of byte ranges of the ``.distcp`` records. These functions turn a plan entry
into those ranges, or return ``None`` (dtype change, FP8 input, a chunk that is not a block of
whole rows, a record stored some other way, a rule that computes): then the caller reads,
transforms and writes tensors as before. Both paths write the same bytes.

A range is ``(fd, offset, length)``; ``fd`` ``None`` means zero bytes (vocab padding rows).
"""
from __future__ import annotations

import math
import os
from typing import Optional

from mapping.row_trace import ZERO, row_block, rule_rows, slice_runs

Ranges = list[tuple[Optional[int], int, int]]


def hf_ranges(plan, ck, e) -> Optional[list[Ranges]]:
    """hf2mcore: per piece of entry ``e``, the HF byte ranges of its stored chunk."""
    infos = [ck.info(h) for h in e.hf]
    dtype, shape = plan.dtypes[e.mcore], plan.shapes[e.mcore]
    if not shape or any(i.scale or i.dtype != dtype or not i.shape or tuple(i.shape[1:]) != shape[1:]
                        for i in infos):
        return None
    runs = rule_rows(e.rule, plan.model.shapes, "to_mcore", tuple(tuple(i.shape) for i in infos), (shape,))
    if runs is None:
        return None
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    where = [ck.location(h) for h in e.hf]
    out = []
    for piece in plan.pieces[e.mcore]:
        block = row_block(piece.view_shape, piece.view_stride, piece.view_offset, shape)
        if block is None or piece.dtype != dtype:
            return None
        out.append([(None, 0, n * row_bytes) if src == ZERO else
                    (where[src][0], where[src][1] + row * row_bytes, n * row_bytes)
                    for src, row, n in slice_runs(runs[0], *block)])
    return out


def mcore_ranges(plan, reader, e, fds: dict) -> Optional[list[Ranges]]:
    """mcore2hf: per HF output of entry ``e``, the ``.distcp`` byte ranges of its data.
    ``fds`` caches open source files (path -> fd); the caller closes them."""
    dtype, shape = plan.dtypes[e.mcore], plan.shapes[e.mcore]
    outs = plan.hf_outputs(e)
    if not shape or any(d != dtype or not s or tuple(s[1:]) != shape[1:] for _, s, d in outs):
        return None
    runs = rule_rows(e.rule, plan.model.shapes, "to_hf", (shape,), tuple(tuple(s) for _, s, _ in outs))
    if runs is None:
        return None
    blocks = []  # (first row, rows, fd, offset) per stored piece
    for piece in plan.pieces[e.mcore]:
        block = row_block(piece.view_shape, piece.view_stride, piece.view_offset, shape)
        loc = reader.chunk_location(piece.key, piece.offsets, piece.sizes) if block else None
        if loc is None or piece.dtype != dtype:
            return None
        if loc[0] not in fds:
            fds[loc[0]] = os.open(loc[0], os.O_RDONLY)
        blocks.append((*block, fds[loc[0]], loc[1]))
    blocks.sort()
    if [b[0] for b in blocks] != [0] + [a + n for a, n, _, _ in blocks[:-1]] or sum(b[1] for b in blocks) != shape[0]:
        return None  # pieces overlap or leave gaps: not a partition into row blocks
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    return [_cut(r, blocks, row_bytes) for r in runs]


def _cut(runs, blocks, row_bytes: int) -> Ranges:
    """Rows of the MCore tensor -> byte ranges of the pieces that hold them."""
    out: Ranges = []
    for src, row, n in runs:
        if src == ZERO:
            out.append((None, 0, n * row_bytes))
            continue
        for first, count, fd, offset in blocks:
            lo, hi = max(row, first), min(row + n, first + count)
            if lo < hi:
                out.append((fd, offset + (lo - first) * row_bytes, (hi - lo) * row_bytes))
    return out


def close_all(fds: dict) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()
