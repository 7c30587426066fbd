"""Megatron-Core ``torch_dist`` checkpoints: the format, the layout a model asks for, and reading.

A ``torch_dist`` checkpoint is a PyTorch DCP directory: ``.metadata`` (a pickled
``torch.distributed.checkpoint.metadata.Metadata``: per key the global shape, dtype and stored
chunks, plus where each chunk's bytes live), ``__<rank>_<k>.distcp`` files holding ``torch.save``
records back to back, ``common.pt`` (non-tensor state) and ``metadata.json``
(``sharded_backend: torch_dist``). Keys, global shapes and chunk offsets are what
``GPTModel.sharded_state_dict()`` of the installed megatron-core reports: we ask a meta-device
model (``layout``) instead of re-deriving them, so the files are what MCore itself would write
at TP=EP=PP=1, and ``dist_checkpointing.load`` reshards them to any layout. For many experts,
``convert.layout_model`` asks a model with few and replicates expert 0's pieces (held equal to a
full model's by ``tests/test_layout_model.py``).

Writing, one tensor at a time, is ``convert.formats.torch_dist_writer``. The reader assembles any
region from whatever chunks a checkpoint has (ours, or one MCore wrote at TP=2), so ``mcore2hf``
reads trainer checkpoints too.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

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


@dataclass(frozen=True)
class ObjectRecord:
    """A sharded object as the model reports it: its state-dict ``name``, storage ``key``, the
    ``global_shape``/``global_offset`` of its prepended (layer, expert) axes, and the piece."""
    name: str
    key: str
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    piece: ObjectPiece


def object_key(key: str, global_shape, global_offset) -> str:
    """Megatron-Core's ``ShardedObject.unique_key`` (``layout_records`` checks this against it)."""
    return f"{key}/shard_{'.'.join(map(str, global_offset))}_{'.'.join(map(str, global_shape))}"


def _payload(data, memo: dict) -> bytes:
    """``torch.save([data])``, as MCore stores an object; serialised once per distinct plain value
    (every local-spec ``_extra_state`` is ``None``: 30k identical records for DeepSeek-V3)."""
    plain = data is None or isinstance(data, (bool, int, float, str, bytes))
    if plain and (type(data), data) in memo:
        return memo[type(data), data]
    buf = io.BytesIO()
    torch.save([data], buf)
    if plain:
        memo[type(data), data] = buf.getvalue()
    return buf.getvalue()


def layout_records(model) -> tuple[dict[str, list[Piece]], list[ObjectRecord], dict[str, tuple[int, ...]]]:
    """Pieces per model tensor, the sharded objects (with their names and axes) and each
    tensor's shape, in the order ``sharded_state_dict()`` reports them, from a model built at
    TP=EP=PP=1 (usually on the meta device)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    tensors = dict(model.state_dict(keep_vars=True))
    pieces: dict[str, list[Piece]] = {}
    objects: list[ObjectRecord] = []
    memo: dict = {}
    for name, value in model.sharded_state_dict(metadata=dict(CONTENT_METADATA)).items():
        if isinstance(value, ShardedTensorFactory):
            value = value.build()
        for sh in _flatten(value, []):
            if isinstance(sh, ShardedObject):
                shape, offset = tuple(sh.global_shape), tuple(sh.global_offset)
                if object_key(sh.key, shape, offset) != sh.unique_key:
                    raise TorchDistError(f"{name}: megatron-core names the object {sh.unique_key}, not "
                                         f"{object_key(sh.key, shape, offset)}; update convert/formats/torch_dist.py")
                objects.append(ObjectRecord(name, sh.key, shape, offset,
                                            ObjectPiece(sh.unique_key, _payload(sh.data, memo))))
            elif isinstance(sh, ShardedTensor):
                base = tensors[name]
                sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
                pieces.setdefault(name, []).append(Piece(
                    sh.key, tuple(sh.global_shape), tuple(sh.global_offset), sizes, sh.dtype, name,
                    tuple(sh.data.shape), tuple(sh.data.stride()),
                    sh.data.storage_offset() - base.storage_offset()))
            else:
                raise TorchDistError(f"{name}: unsupported sharded entry {type(sh).__name__}")
    return pieces, objects, {k: tuple(tensors[k].shape) for k in pieces}


def layout(model) -> tuple[dict[str, list[Piece]], list[ObjectPiece], dict[str, tuple[int, ...]]]:
    """Pieces per model tensor, sharded objects, and each tensor's shape, from a model built at
    TP=EP=PP=1 (usually on the meta device). ``convert.layout_model`` derives the same for a
    full-size model from a model with few experts."""
    pieces, objects, shapes = layout_records(model)
    return pieces, [o.piece for o in objects], shapes


def piece_of(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The chunk ``piece`` of a full, contiguous model tensor, shaped as stored."""
    view = tensor.contiguous().as_strided(piece.view_shape, piece.view_stride, piece.view_offset)
    return view.reshape(piece.sizes).contiguous()


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
        # (key, chunk offsets) -> where its record is / its sizes: looked up per chunk, and a stacked
        # expert key has thousands of chunks (a scan per lookup made mcore2hf quadratic)
        self._stored: dict[tuple, _StorageInfo] = {
            (index.fqn, tuple(index.offset or ())): info for index, info in self.meta.storage_data.items()}
        self._heads: dict[tuple, list[tuple[int, bytes]]] = {}  # (sizes, dtype) -> (data start, record head)
        self._sizes: dict[tuple, tuple] = {
            (key, tuple(c.offsets)): tuple(c.sizes) for key, md in self.meta.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata) for c in md.chunks}

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
        if self._sizes.get((key, tuple(offsets))) != tuple(sizes):
            return None
        info = self._storage(key, offsets)
        with open(self.dir / info.relative_path, "rb", buffering=0) as f:
            start = self._data_start(f.fileno(), info, tuple(sizes), md.properties.dtype)
        if start is None:
            return None
        if start + math.prod(sizes) * md.properties.dtype.itemsize > info.length:
            raise TorchDistError(f"{self.dir / info.relative_path}: record of {key}@{list(offsets)} is "
                                 "shorter than its tensor; the checkpoint is damaged, re-create it")
        return self.dir / info.relative_path, info.offset + start

    def _data_start(self, fd: int, info: _StorageInfo, sizes: tuple, dtype: torch.dtype) -> int | None:
        """Where a record's tensor data starts, if it is one contiguous tensor of ``sizes`` and
        ``dtype``. Records of equal dtype and shape written alike have byte-identical heads (zip
        headers and pickle: dtype, shape, strides): a record whose first ``start`` bytes equal a
        parsed one's has its data at ``start`` too, without ``torch.load`` (0.4 ms a record: 18 s
        for DeepSeek-V3's 46k chunks)."""
        for start, head in self._heads.get((sizes, dtype), ()):
            if start <= info.length and os.pread(fd, start, info.offset) == head:
                return start
        t = torch.load(_Window(fd, info.offset, info.length), map_location="meta", weights_only=True)
        base = getattr(t.untyped_storage(), "_checkpoint_offset", None) if isinstance(t, torch.Tensor) else None
        if base is None or tuple(t.shape) != sizes or t.dtype != dtype or not t.is_contiguous():
            return None
        start = base + t.storage_offset() * t.element_size()
        self._heads.setdefault((sizes, dtype), []).append((start, os.pread(fd, start, info.offset)))
        return start

    def read_region(self, key: str, offsets, sizes) -> torch.Tensor:
        """The sub-tensor ``[offsets, offsets + sizes)`` of global tensor ``key``."""
        md = self.tensor_meta(key)
        if self._sizes.get((key, tuple(offsets))) == tuple(sizes):  # stored exactly as asked (ours always)
            data = self._load(self._storage(key, offsets))
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
        info = self._stored.get((key, tuple(offsets)))
        if info is None:
            raise TorchDistError(f"{self.dir}: chunk {key}@{list(offsets)} listed but not stored")
        return info

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
