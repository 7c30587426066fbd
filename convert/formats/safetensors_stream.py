"""Write safetensors files tensor by tensor: the header first (shapes are planned), then bytes.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; with 5 GB shards
that is the peak memory of the whole export. Here a shard's header is written from its plan and
the tensors follow one at a time, in header order, so memory stays at one tensor. Files are
written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from convert.formats.filecopy import Writeback, copy_ranges
from mapping.rules import stacked_slice

ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
            torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
            torch.float8_e5m2: "F8_E5M2"}


def nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def stacked_specs(specs: list[tuple[str, tuple, torch.dtype]]) -> list[tuple[str, tuple, torch.dtype]]:
    """Consecutive slice specs ``("x[0]", s, d), ("x[1]", s, d), ...`` merged into ``("x", (n, *s), d)``
    (``mapping.rules.EXPERT_SLICE``); slices must come complete and in order."""
    out: list[tuple[str, tuple, torch.dtype]] = []
    for name, shape, dtype in specs:
        sliced = stacked_slice(name)
        if sliced is None:
            out.append((name, tuple(shape), dtype))
            continue
        base, index = sliced
        if index == 0:
            out.append((base, (1, *shape), dtype))
            continue
        last = out[-1] if out else None
        if last is None or last[0] != base or last[1][0] != index or last[1][1:] != tuple(shape) or last[2] != dtype:
            raise ValueError(f"{name}: slices of {base} must be planned in order 0, 1, ... with one shape and dtype")
        out[-1] = (base, (index + 1, *shape), dtype)
    return out


class StreamingSafetensors:
    """``with StreamingSafetensors(path, [(name, shape, dtype), ...]) as w: w.write(name, t)``.

    A stacked tensor (``stacked_specs``) may be written whole or slice by slice: ``w.write("x[0]",
    t0)``, ``w.write("x[1]", t1)``, ... in order."""

    def __init__(self, path: str | Path, specs: list[tuple[str, tuple, torch.dtype]], metadata=None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        header, offset = {}, 0
        for name, shape, dtype in specs:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt", **(metadata or {})}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.order = [s[0] for s in specs]
        self.specs = {name: (tuple(shape), dtype) for name, shape, dtype in specs}
        self._next = 0
        self._part = 0  # slices of the current stacked tensor written so far
        self._f = open(self.tmp, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._f.flush()
        self._writeback = Writeback(self.tmp)  # each finished tensor starts going to disk

    def _expect(self, name: str) -> tuple[tuple, torch.dtype]:
        """The shape and dtype ``name`` must have: the next tensor, or its next slice."""
        want = self.order[self._next] if self._next < len(self.order) else None
        sliced = stacked_slice(name)
        if name == want and not self._part:
            return self.specs[name]
        if sliced and sliced == (want, self._part):
            shape, dtype = self.specs[want]
            return shape[1:], dtype
        expected = f"{want}[{self._part}]" if self._part else want
        raise ValueError(f"{self.path.name}: expected tensor {expected}, got {name}")

    def _advance(self, name: str) -> None:
        if stacked_slice(name) is None:
            self._next += 1
            return
        self._part += 1
        if self._part == self.specs[self.order[self._next]][0][0]:
            self._next, self._part = self._next + 1, 0

    def write(self, name: str, t: torch.Tensor) -> None:
        shape, dtype = self._expect(name)
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{self.path.name}: {name} is {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
        self._f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))  # no extra copy
        self._advance(name)
        self._f.flush()
        self._writeback.upto(self._f.tell())

    def write_copied(self, name: str, ranges: list[tuple[int | None, int, int]]) -> None:
        """Like ``write``, with the tensor's bytes copied file to file from ``ranges``
        (``(fd, offset, length)``, fd ``None`` = zeros; see ``convert.formats.filecopy``)."""
        shape, dtype = self._expect(name)
        size = nbytes(shape, dtype)
        if sum(n for _, _, n in ranges) != size:
            raise ValueError(f"{self.path.name}: {name} planned {size} bytes, "
                             f"{sum(n for _, _, n in ranges)} given")
        self._f.flush()
        at = self._f.tell()
        copy_ranges(self._f.fileno(), at, ranges)
        self._f.seek(at + size)
        self._advance(name)
        self._writeback.upto(at + size)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._writeback.close()
        if exc_type is None:
            if self._next != len(self.order):
                raise ValueError(f"{self.path.name}: only {self._next}/{len(self.order)} tensors written")
            os.replace(self.tmp, self.path)
        return False
