"""Read a Hugging Face safetensors checkpoint lazily: index first, tensor data on demand.

``HFCheckpoint(dir)`` parses ``config.json``, ``model.safetensors.index.json`` (or a single
``model.safetensors``) and every shard's header, so names, dtypes, shapes and byte sizes are
known with no tensor data read. It refuses, with one line naming the file and the fix:
a shard named in the index that is missing, a ``weight_map`` entry escaping the checkpoint
directory, a truncated shard (file shorter than its header says), a tensor the index lists but
the shard lacks.

DeepSeek FP8 checkpoints: a ``W`` stored as ``float8_e4m3fn`` with a companion
``W_scale_inv`` is presented as one logical tensor ``W`` (bf16 after block dequantisation);
``*_scale_inv`` names disappear from ``names()``. A weight without its scale, or a scale without
its weight, is an error.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mapping.rules import stacked_slice

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
             "F8_E5M2": torch.float8_e5m2}


def transformers_config(published: dict, dtype: torch.dtype):
    """transformers' config object for a config.json dict, without remote code: a ``model_type``
    transformers does not know (Kimi-K2 publishes ``kimi_k2`` with an ``auto_map`` to its own copy of
    the DeepSeek-V3 code) is resolved through its architecture name to the built-in class."""
    from transformers import CONFIG_MAPPING, AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = published["model_type"]
    if model_type not in CONFIG_MAPPING:
        by_arch = {arch: mt for mt, arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
        arch = (published.get("architectures") or ["?"])[0]
        if arch not in by_arch:
            raise ValueError(f"model_type {model_type!r} and architecture {arch!r} are unknown to transformers")
        model_type = by_arch[arch]
    skip = ("model_type", "auto_map", "quantization_config", "torch_dtype", "dtype", "transformers_version")
    kwargs = {k: copy.deepcopy(v) for k, v in published.items() if k not in skip}  # HF mutates
    return AutoConfig.for_model(model_type, dtype=dtype, **kwargs)


class CheckpointError(ValueError):
    """The input checkpoint is unusable; the message names the file/tensor and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    scale: Optional[str] = None  # name of the FP8 block-scale companion, if any
    offset: int = 0              # absolute byte offset of the data in ``file``

    @property
    def out_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.scale else self.dtype


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header of ``path`` (tensor name -> dtype/shape/data_offsets) and the
    file offset where the data section begins."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes); re-download it")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size}; "
                                  "the file is truncated or not safetensors; re-download it")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: tensors need {8 + n + end} bytes, file has {size}; "
                              "re-download or re-copy this shard")
    return header, 8 + n


class HFCheckpoint:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory; pass the HF checkpoint folder")
        owner = self.dir / ".conversion.json"
        if owner.is_file() and json.loads(owner.read_text()).get("status") != "complete":
            raise CheckpointError(f"{self.dir}: written by a conversion that did not finish; re-run it")
        cfg = self.dir / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{cfg}: missing; an HF checkpoint folder needs its config.json")
        self.config = json.loads(cfg.read_text())
        self._handles: dict[str, object] = {}
        self._files = self._weight_map()  # every stored tensor (scales included) -> shard file
        self._stored = self._scan()       # every stored tensor, scales included
        self.tensors = self._pair_scales(self._stored)

    # ------------------------------------------------------------------ index
    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.is_file():
            wm = json.loads(index.read_text()).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{index}: no weight_map; regenerate the index")
            return wm
        if (self.dir / SINGLE).is_file():
            return {name: SINGLE for name in read_header(self.dir / SINGLE)[0]}
        raise CheckpointError(f"{self.dir}: neither {INDEX} nor {SINGLE}; not an HF safetensors checkpoint")

    def _scan(self) -> dict[str, TensorInfo]:
        wm = self._files
        root = self.dir.resolve()
        headers = {}
        for fname in sorted(set(wm.values())):
            path = (self.dir / fname).resolve()
            if root not in path.parents:
                raise CheckpointError(f"{self.dir / INDEX}: weight_map entry {fname!r} points outside "
                                      f"the checkpoint directory; refusing to read it")
            if not path.is_file():
                raise CheckpointError(f"{path}: shard named in {INDEX} is missing; re-download it")
            headers[fname] = read_header(path)
        out = {}
        for name, fname in wm.items():
            h = headers[fname][0].get(name)
            if h is None:
                raise CheckpointError(f"{self.dir / fname}: tensor {name} listed in {INDEX} is not in "
                                      "the shard; the index and shards disagree")
            dtype = ST_DTYPES[h["dtype"]]
            start, end = h["data_offsets"]
            out[name] = TensorInfo(name, fname, dtype, tuple(h["shape"]), end - start,
                                   offset=headers[fname][1] + start)
        return out

    def _pair_scales(self, raw: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        out = {}
        for name, info in raw.items():
            if name.endswith(SCALE_SUFFIX):
                weight = name[: -len(SCALE_SUFFIX)]
                if weight not in raw:
                    raise CheckpointError(f"{name}: block scale without its weight {weight}; the "
                                          "checkpoint is incomplete: re-download or repair it")
                if raw[weight].dtype != torch.float8_e4m3fn:
                    raise CheckpointError(f"{name}: block scale for {weight}, which is {raw[weight].dtype}, "
                                          "not float8_e4m3fn; remove the stray scale or re-download")
                continue
            scale = name + SCALE_SUFFIX
            if info.dtype == torch.float8_e4m3fn:
                if scale not in raw:
                    raise CheckpointError(f"{name}: float8_e4m3fn weight without its {SCALE_SUFFIX} "
                                          "companion; the FP8 checkpoint is incomplete")
                block = self.block_size
                want = tuple(math.ceil(d / block) for d in info.shape)
                if raw[scale].shape != want:
                    raise CheckpointError(f"{scale}: shape {list(raw[scale].shape)} does not match weight "
                                          f"{list(info.shape)} with {block}x{block} blocks (expected "
                                          f"{list(want)}); check weight_block_size in config.json or re-download")
                info = dataclasses.replace(info, scale=scale)
            out[name] = info
        return out

    @property
    def block_size(self) -> int:
        q = self.config.get("quantization_config") or {}
        return int((q.get("weight_block_size") or [128, 128])[0])

    # ------------------------------------------------------------------ data
    def names(self) -> list[str]:
        return list(self.tensors)

    def _handle(self, fname: str):
        if fname not in self._handles:
            self._handles[fname] = open(self.dir / fname, "rb")
        return self._handles[fname]

    def info(self, name: str) -> TensorInfo:
        """A logical tensor's info; ``"x[E]"`` is expert E's slice along dim 0 of a stored tensor
        ``x`` that stacks all experts (``mapping.rules.EXPERT_SLICE``): its rows, read in place."""
        if name in self.tensors:
            return self.tensors[name]
        sliced = stacked_slice(name)
        base = self.tensors.get(sliced[0]) if sliced else None
        if base is None:
            raise CheckpointError(f"{self.dir}: tensor {name} not found in the checkpoint")
        index = sliced[1]
        if base.scale or not base.shape or not 0 <= index < base.shape[0]:
            raise CheckpointError(f"{self.dir}: {name}: {sliced[0]} has shape {list(base.shape)}"
                                  f"{' and a block scale' if base.scale else ''}; no slice {index} along dim 0")
        size = base.nbytes // base.shape[0]
        return dataclasses.replace(base, name=name, shape=base.shape[1:], nbytes=size, offset=base.offset + index * size)

    def location(self, name: str) -> tuple[int, int]:
        """``(open file descriptor, byte offset)`` of a stored tensor's data, for file-to-file copies."""
        info = self._stored[name] if name in self._stored else self.info(name)
        return self._handle(info.file).fileno(), info.offset

    def raw(self, name: str) -> torch.Tensor:
        """The stored tensor (FP8 stays FP8), copied into memory."""
        info = self._stored[name] if name in self._stored else self.info(name)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        f = self._handle(info.file)
        f.seek(info.offset)
        # Plain reads into our own buffer: the shards are not memory-mapped, so their pages do not
        # pile up in this process's RSS as the conversion walks through the checkpoint.
        if f.readinto(memoryview(buf.numpy())) != info.nbytes:
            raise CheckpointError(f"{self.dir / info.file}: short read of {name}; the file changed or is "
                                  "truncated; re-copy it")
        return buf.view(info.dtype).reshape(info.shape)

    def get(self, name: str) -> torch.Tensor:
        """The logical tensor: FP8 weights are block-dequantised to bf16; ``"x[E]"`` as in ``info``."""
        info = self.info(name)
        if info.scale is None:
            return self.raw(name)
        from kernels import fp8_block_dequant

        return fp8_block_dequant(self.raw(name), self.raw(info.scale).float(), self.block_size)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
