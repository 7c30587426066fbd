"""Write Megatron-Core ``torch_dist`` checkpoints one chunk at a time (the reading side and the
format itself: ``convert.formats.torch_dist``).

``Writer`` appends ``torch.save`` records to this rank's ``__<rank>_0.distcp`` file and remembers
where each landed (``records``); ``write_copied`` writes the same record with its bytes copied file
to file. ``finalize`` writes ``.metadata`` (the pickled DCP ``Metadata``), ``common.pt`` and
``metadata.json`` once every rank has written, with bytes independent of how the records were
produced (fresh or resumed). MCore's own ``dist_checkpointing.save`` needs every tensor in memory
at once; this writer holds one.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Iterable

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)

from convert.formats.filecopy import copy_ranges
from convert.formats.torch_dist import METADATA_JSON, ObjectPiece, Piece, TorchDistError


def encode_record(rec) -> list:
    index, info = rec
    return [index.fqn, None if index.offset is None else list(index.offset), info.offset, info.length]


def decode_record(row, relpath: str):
    fqn, offset, start, length = row
    return (MetadataIndex(fqn, None if offset is None else torch.Size(offset)),
            _StorageInfo(relpath, start, length))


class Writer:
    """Appends chunks to this rank's ``__<rank>_0.distcp``; ``records()`` says where each went."""

    def __init__(self, directory: str | Path, rank: int = 0, resume_at: int = 0, records=()):
        """``resume_at``: keep the first bytes of an earlier attempt's file (whose ``records``
        are known) and append after them; anything beyond is dropped."""
        self.dir = Path(directory)
        self.relpath = f"__{rank}_0.distcp"
        path = self.dir / self.relpath
        if resume_at and path.is_file() and path.stat().st_size >= resume_at:
            self._f = open(path, "r+b")
            self._f.truncate(resume_at)
            self._f.seek(resume_at)
            self._records = [decode_record(r, self.relpath) for r in records]
        else:
            self._f = open(path, "wb")
            self._records = []

    def tell(self) -> int:
        self._f.flush()
        return self._f.tell()

    def records_since(self, n: int) -> list:
        return [encode_record(r) for r in self._records[n:]]

    @property
    def count(self) -> int:
        return len(self._records)

    def _append(self, index: MetadataIndex, payload: bytes) -> None:
        start = self._f.tell()
        self._f.write(payload)
        self._records.append((index, _StorageInfo(self.relpath, start, len(payload))))

    def write_tensor(self, piece: Piece, chunk: torch.Tensor) -> None:
        if tuple(chunk.shape) != piece.sizes or chunk.dtype != piece.dtype:
            raise TorchDistError(f"{piece.key}: chunk {tuple(chunk.shape)} {chunk.dtype} != planned "
                                 f"{piece.sizes} {piece.dtype}")
        chunk = chunk.contiguous()
        if chunk.storage_offset() or chunk.untyped_storage().nbytes() != chunk.nbytes:
            chunk = chunk.clone()  # torch.save writes the whole storage: a view would drag its base along
        start = self._f.tell()
        self._save(chunk, self._f)  # straight into the file: no in-memory copy
        self._records.append((MetadataIndex(piece.key, torch.Size(piece.offsets)),
                              _StorageInfo(self.relpath, start, self._f.tell() - start)))

    def write_copied(self, piece: Piece, ranges: list[tuple[int | None, int, int]]) -> None:
        """The record ``write_tensor`` would write, byte for byte, with the tensor's bytes copied
        file to file from ``ranges`` (``(fd, offset, length)``, fd ``None`` = zeros), in order:
        ``torch.save`` writes the record around a hole (``skip_data``), the ranges fill it."""
        if sum(n for _, _, n in ranges) != piece.nbytes:
            raise TorchDistError(f"{piece.key}: {sum(n for _, _, n in ranges)} source bytes for a "
                                 f"{piece.nbytes}-byte chunk")
        start = self._f.tell()
        holes = _HoleRecorder(self._f)
        with torch.serialization.skip_data():
            self._save(torch.empty(piece.sizes, dtype=piece.dtype), holes)  # never touched: no RSS
        if [n for _, n in holes.holes] != [piece.nbytes]:
            raise TorchDistError(f"{piece.key}: torch.save left holes {holes.holes}, expected one of "
                                 f"{piece.nbytes} bytes; this torch version's record layout is not supported")
        self._f.flush()
        copy_ranges(self._f.fileno(), holes.holes[0][0], ranges)
        self._records.append((MetadataIndex(piece.key, torch.Size(piece.offsets)),
                              _StorageInfo(self.relpath, start, self._f.tell() - start)))

    def _save(self, tensor: torch.Tensor, f) -> None:
        try:
            with _no_crc32():
                torch.save(tensor, f)
        except RuntimeError as err:  # torch's zip writer reports a failed write as RuntimeError
            if os.statvfs(self.dir).f_bavail * os.statvfs(self.dir).f_frsize < tensor.nbytes + (1 << 20):
                raise OSError(errno.ENOSPC, "No space left on device", str(self.dir / self.relpath)) from err
            raise

    def write_object(self, obj: ObjectPiece) -> None:
        self._append(MetadataIndex(obj.unique_key), obj.payload)

    def close(self) -> list:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._records

    def abort(self) -> None:
        """Close without syncing (the error path); the journal decides what is kept."""
        try:
            self._f.close()
        except OSError:
            pass


class _HoleRecorder:
    """File object for ``torch.save`` under ``skip_data``: writes go to ``f``; the seeks past
    each storage's bytes are recorded as ``(file offset, length)`` holes."""

    def __init__(self, f):
        self._f, self.holes = f, []

    def write(self, data) -> int:
        return self._f.write(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR and offset:
            self.holes.append((self._f.tell(), offset))
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()


@contextlib.contextmanager
def _no_crc32():
    """``torch.save`` without the per-record CRC32: it cost ~0.35 s per GB here (more than the
    write itself), and ``torch.load`` (hence DCP and MCore's loader) never checks it."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def finalize(directory: str | Path, pieces: Iterable[Piece], objects: Iterable[ObjectPiece],
             records: Iterable[tuple[MetadataIndex, _StorageInfo]], common: dict | None = None) -> None:
    """Write ``.metadata``, ``common.pt`` (``common``: the non-tensor state) and ``metadata.json``
    once every rank has written."""
    directory = Path(directory)
    sd_meta: dict = {}
    # Interned strings and fresh objects everywhere: pickle memoises by identity, so this makes
    # the .metadata bytes independent of how the records were produced (fresh or resumed).
    for p in pieces:
        md = sd_meta.setdefault(sys.intern(p.key), TensorStorageMetadata(
            TensorProperties(dtype=p.dtype), torch.Size(p.global_shape), []))
        md.chunks.append(ChunkStorageMetadata(torch.Size(p.offsets), torch.Size(p.sizes)))
    for o in objects:
        sd_meta[sys.intern(o.unique_key)] = BytesStorageMetadata()
    storage = {MetadataIndex(sys.intern(i.fqn), None if i.offset is None else torch.Size(tuple(i.offset))):
               _StorageInfo(sys.intern(f.relative_path), f.offset, f.length) for i, f in records}
    missing = [k for k in sd_meta if not any(i.fqn == k for i in storage)]
    if missing:
        raise TorchDistError(f"{len(missing)} checkpoint keys were never written, e.g. {missing[:3]}")
    meta = Metadata(state_dict_metadata=sd_meta, storage_data=storage,
                    storage_meta=StorageMeta())  # location-independent bytes
    _atomic_write(directory / ".metadata", pickle.dumps(meta))
    buf = io.BytesIO()
    torch.save(common or {}, buf)
    _atomic_write(directory / "common.pt", buf.getvalue())
    _atomic_write(directory / "metadata.json", json.dumps(METADATA_JSON).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
