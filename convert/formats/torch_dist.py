"""Megatron-Core ``torch_dist`` checkpoints: the format, the layout a model asks for, and reading.

A ``torch_dist`` checkpoint is a PyTorch DCP directory: ``.metadata`` (a pickled
``torch.distributed.checkpoint.metadata.Metadata``: per key the global shape, dtype and stored
chunks, plus where each chunk's bytes live), ``__<rank>_<k>.distcp`` files holding ``torch.save``
records back to back, ``common.pt`` (non-tensor state) and ``metadata.json``
(``sharded_backend: torch_dist``). Keys, global shapes and chunk offsets are what
``GPTModel.sharded_state_dict()`` of the installed megatron-core reports: we ask a meta-device
model (``layout``) instead of re-deriving them, so the files are what MCore itself would write
at TP=EP=PP=1, and ``dist_checkpointing.load`` reshards them to any layout.

Writing, one tensor at a time, is ``convert.formats.torch_dist_writer``. The reader assembles any
region from whatever chunks a checkpoint has (ours, or one MCore wrote at TP=2), so ``mcore2hf``
reads trainer checkpoints too.
"""
from __future__ import annotations

import io
import json
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
