"""Stream tensors into, and out of, Megatron-Core ``torch_dist`` checkpoints, one at a time.

A ``torch_dist`` checkpoint is a PyTorch DCP directory: ``.metadata`` (a pickled
``torch.distributed.checkpoint.metadata.Metadata``: per key the global shape, dtype and stored
chunks, plus where each chunk's bytes live), ``__<rank>_<k>.distcp`` files holding ``torch.save``
records back to back, ``common.pt`` (non-tensor state) and ``metadata.json``
(``sharded_backend: torch_dist``). Keys, global shapes and chunk offsets are what
``GPTModel.sharded_state_dict()`` of the installed megatron-core reports: we ask a meta-device
model (``layout``) instead of re-deriving them, so the files are what MCore itself would write
at TP=EP=PP=1, and ``dist_checkpointing.load`` reshards them to any layout.

MCore's own ``dist_checkpointing.save`` needs every tensor in memory at once; this writer holds
one tensor at a time. The reader assembles any region from whatever chunks a checkpoint has
(ours, or one MCore wrote at TP=2), so ``mcore2hf`` reads trainer checkpoints too.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)

from convert.formats.filecopy import copy_ranges
from mapping.layout import CONTENT_METADATA

METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}


class TorchDistError(ValueError):
    """The MCore checkpoint is unusable; the message names the key/file and the fix."""


@dataclass(frozen=True)
class Piece:
    """One stored chunk of one model tensor: where it sits in the checkpoint key's global tensor
    (``offsets``/``sizes``, prepended axes included) and which view of the model tensor it is
    (``view_shape``/``view_stride``/``view_offset`` relative to the contiguous model tensor)."""
    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    param: str
    view_shape: tuple[int, ...]
    view_stride: tuple[int, ...]
    view_offset: int

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.view_shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class ObjectPiece:
    unique_key: str
    payload: bytes


def encode_record(rec) -> list:
    index, info = rec
    return [index.fqn, None if index.offset is None else list(index.offset), info.offset, info.length]


def decode_record(row, relpath: str):
    fqn, offset, start, length = row
    return (MetadataIndex(fqn, None if offset is None else torch.Size(offset)),
            _StorageInfo(relpath, start, length))


def _flatten(obj, out: list):
    if isinstance(obj, dict):
        for v in obj.values():
            _flatten(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _flatten(v, out)
    else:
        out.append(obj)
    return out


def layout(model) -> tuple[dict[str, list[Piece]], list[ObjectPiece], dict[str, torch.Tensor]]:
    """Pieces per model tensor, sharded objects, and the (meta) model tensors, from a model built
    at TP=EP=PP=1 (usually on the meta device)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    tensors = dict(model.state_dict(keep_vars=True))
    pieces: dict[str, list[Piece]] = {}
    objects: list[ObjectPiece] = []
    for name, value in model.sharded_state_dict(metadata=dict(CONTENT_METADATA)).items():
        if isinstance(value, ShardedTensorFactory):
            value = value.build()
        for sh in _flatten(value, []):
            if isinstance(sh, ShardedObject):
                buf = io.BytesIO()
                torch.save([sh.data], buf)
                objects.append(ObjectPiece(sh.unique_key, buf.getvalue()))
            elif isinstance(sh, ShardedTensor):
                base = tensors[name]
                sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
                pieces.setdefault(name, []).append(Piece(
                    sh.key, tuple(sh.global_shape), tuple(sh.global_offset), sizes, sh.dtype, name,
                    tuple(sh.data.shape), tuple(sh.data.stride()),
                    sh.data.storage_offset() - base.storage_offset()))
            else:
                raise TorchDistError(f"{name}: unsupported sharded entry {type(sh).__name__}")
    return pieces, objects, tensors


def piece_of(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The chunk ``piece`` of a full, contiguous model tensor, shaped as stored."""
    view = tensor.contiguous().as_strided(piece.view_shape, piece.view_stride, piece.view_offset)
    return view.reshape(piece.sizes).contiguous()


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


class Reader:
    """Random access to a ``torch_dist`` directory's tensors by key and region."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        mj = self.dir / "metadata.json"
        if not mj.is_file() or not (self.dir / ".metadata").is_file():
            raise TorchDistError(f"{self.dir}: not a complete torch_dist checkpoint (metadata.json / "
                                 ".metadata missing); was the conversion interrupted? re-run it")
        backend = json.loads(mj.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise TorchDistError(f"{mj}: sharded_backend {backend!r}; only torch_dist is supported")
        with open(self.dir / ".metadata", "rb") as f:
            self.meta: Metadata = pickle.load(f)
        self._chunks: dict[str, list[tuple[MetadataIndex, _StorageInfo]]] = {}
        for index, info in self.meta.storage_data.items():
            self._chunks.setdefault(index.fqn, []).append((index, info))

    def keys(self) -> list[str]:
        return list(self.meta.state_dict_metadata)

    def tensor_meta(self, key: str) -> TensorStorageMetadata:
        md = self.meta.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise TorchDistError(f"{self.dir}: no tensor {key!r} in the checkpoint; was it written "
                                 "for another model or spec (local vs te)?")
        return md

    def _load(self, info: _StorageInfo):
        # torch.load reads the record through readinto(): the bytes go from the page cache
        # straight into the tensor's storage (no bytes object, no BytesIO copy).
        with open(self.dir / info.relative_path, "rb", buffering=0) as f:
            return torch.load(_Window(f.fileno(), info.offset, info.length), weights_only=True)

    def chunk_location(self, key: str, offsets, sizes) -> tuple[Path, int] | None:
        """``(file, byte offset)`` of the stored chunk ``key@offsets`` of exactly ``sizes``, when
        its bytes lie contiguously in the file; else ``None`` (then use ``read_region``). Reads
        only the record's header and pickle (``map_location="meta"``), not its data."""
        md = self.tensor_meta(key)
        if not any(tuple(c.offsets) == tuple(offsets) and tuple(c.sizes) == tuple(sizes) for c in md.chunks):
            return None
        info = self._storage(key, offsets)
        with open(self.dir / info.relative_path, "rb", buffering=0) as f:
            t = torch.load(_Window(f.fileno(), info.offset, info.length), map_location="meta", weights_only=True)
        base = getattr(t.untyped_storage(), "_checkpoint_offset", None) if isinstance(t, torch.Tensor) else None
        if (base is None or tuple(t.shape) != tuple(sizes) or t.dtype != md.properties.dtype
                or not t.is_contiguous()):
            return None
        start = base + t.storage_offset() * t.element_size()
        if start + t.nbytes > info.length:
            raise TorchDistError(f"{self.dir / info.relative_path}: record of {key}@{list(offsets)} is "
                                 "shorter than its tensor; the checkpoint is damaged, re-create it")
        return self.dir / info.relative_path, info.offset + start

    def read_region(self, key: str, offsets, sizes) -> torch.Tensor:
        """The sub-tensor ``[offsets, offsets + sizes)`` of global tensor ``key``."""
        md = self.tensor_meta(key)
        for chunk in md.chunks:  # stored exactly as asked (always, for our own checkpoints)
            if tuple(chunk.offsets) == tuple(offsets) and tuple(chunk.sizes) == tuple(sizes):
                data = self._load(self._storage(key, chunk.offsets))
                if tuple(data.shape) == tuple(sizes) and data.dtype == md.properties.dtype:
                    return data
        out = torch.empty(tuple(sizes), dtype=md.properties.dtype)
        covered = 0
        for chunk in md.chunks:
            lo = [max(a, b) for a, b in zip(offsets, chunk.offsets)]
            hi = [min(a + s, b + t) for a, s, b, t in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(l >= h for l, h in zip(lo, hi)):
                continue
            data = self._load(self._storage(key, chunk.offsets))
            src = data[tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, chunk.offsets))]
            out[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))] = src
            covered += src.numel()
        if covered != out.numel():
            raise TorchDistError(f"{self.dir}: key {key} region {list(offsets)}+{list(sizes)} is only "
                                 f"partly stored ({covered}/{out.numel()} elements)")
        return out

    def _storage(self, key: str, offsets) -> _StorageInfo:
        for index, info in self._chunks.get(key, []):
            if tuple(index.offset) == tuple(offsets):
                return info
        raise TorchDistError(f"{self.dir}: chunk {key}@{list(offsets)} listed but not stored")

    def read_param(self, pieces: list[Piece], shape: tuple[int, ...]) -> torch.Tensor:
        """Reassemble one model tensor (TP=1 layout) from its pieces."""
        if len(pieces) == 1 and _is_whole(pieces[0], shape):  # no assembly: return the chunk
            return self.read_region(pieces[0].key, pieces[0].offsets, pieces[0].sizes).reshape(shape)
        out = torch.empty(shape, dtype=self.tensor_meta(pieces[0].key).properties.dtype)
        for p in pieces:
            region = self.read_region(p.key, p.offsets, p.sizes)
            out.as_strided(p.view_shape, p.view_stride, p.view_offset).copy_(region.reshape(p.view_shape))
        return out


def _is_whole(piece: Piece, shape: tuple[int, ...]) -> bool:
    """Whether ``piece`` is the entire model tensor, laid out contiguously."""
    return (piece.view_offset == 0 and tuple(piece.view_shape) == tuple(shape)
            and tuple(piece.view_stride) == tuple(torch.empty(shape, device="meta").stride()))


class _Window(io.RawIOBase):
    """A read-only file object over ``[start, start + length)`` of an open file descriptor,
    with positioned reads (``os.preadv``) straight into the caller's buffer."""

    def __init__(self, fd: int, start: int, length: int):
        super().__init__()
        self._fd, self._start, self._len, self._pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self._len - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._fd, [memoryview(buf).cast("B")[:n]], self._start + self._pos)
        self._pos += got
        return got
