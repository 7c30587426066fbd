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

gpt-oss MXFP4 checkpoints: ``W_blocks`` (uint8 ``[*P, R, G, 16]``) with ``W_scales`` (uint8
``[*P, R, G]``) are presented as one logical tensor ``W``, the bf16 tensor transformers makes of
them (``kernels.mxfp4_dequant(..., layout="transformers")``: ``[*P, 32 G, R]``, e.g. gate_up_proj
``[E, H, 2I]``); ``W[E]`` is expert E's slice, dequantised from the blocks' and scales' slices
only. The same errors for an unpaired or misshapen ``_blocks``/``_scales``.
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
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"  # gpt-oss: W_blocks + W_scales = W

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
    scale: Optional[str] = None  # name of the FP8 block-scale (or MXFP4 ``_scales``) companion, if any
    offset: int = 0              # absolute byte offset of the data in ``file``
    blocks: Optional[str] = None  # MXFP4: the stored ``_blocks`` tensor (``dtype``, ``nbytes``, ``offset`` are its)

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
            if info.dtype == torch.uint8 and name.endswith(MXFP4_BLOCKS):
                logical = self._mxfp4(name[: -len(MXFP4_BLOCKS)], raw)
                out[logical.name] = logical
                continue
            if info.dtype == torch.uint8 and name.endswith(MXFP4_SCALES):
                if name[: -len(MXFP4_SCALES)] + MXFP4_BLOCKS not in raw:
                    raise CheckpointError(f"{name}: MXFP4 scales without their {name[: -len(MXFP4_SCALES)]}"
                                          f"{MXFP4_BLOCKS}; the checkpoint is incomplete: re-download or repair it")
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

    def _mxfp4(self, name: str, raw: dict[str, TensorInfo]) -> TensorInfo:
        """The logical tensor ``name`` of an MXFP4 ``name_blocks`` / ``name_scales`` pair."""
        from kernels.mxfp4_reference import mxfp4_out_shape

        blocks, scales = raw[name + MXFP4_BLOCKS], raw.get(name + MXFP4_SCALES)
        if scales is None:
            raise CheckpointError(f"{blocks.name}: MXFP4 blocks without their {name}{MXFP4_SCALES}; the "
                                  "checkpoint is incomplete: re-download or repair it")
        if name in raw:
            raise CheckpointError(f"{name}: stored both plain and as MXFP4 {blocks.name}; keep one of them")
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or len(blocks.shape) < 3 \
                or blocks.shape[-1] != 16 or scales.shape != blocks.shape[:-1]:
            raise CheckpointError(f"{blocks.name} {blocks.dtype} {list(blocks.shape)} / {scales.name} {scales.dtype} "
                                  f"{list(scales.shape)}: not an MXFP4 pair (uint8 [..., rows, groups, 16] and uint8 "
                                  "[..., rows, groups]); re-download or repair the checkpoint")
        return dataclasses.replace(blocks, name=name, shape=mxfp4_out_shape(blocks.shape, "transformers"),
                                   scale=scales.name, blocks=blocks.name)

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
        if (base.scale and not base.blocks) or not base.shape or not 0 <= index < base.shape[0]:
            raise CheckpointError(f"{self.dir}: {name}: {sliced[0]} has shape {list(base.shape)}"
                                  f"{' and a block scale' if base.scale else ''}; no slice {index} along dim 0")
        if base.blocks:  # MXFP4: the expert's rows of the blocks and of the scales
            blocks = self._slice(self._stored[base.blocks], index)
            return dataclasses.replace(blocks, name=name, shape=base.shape[1:], scale=f"{base.scale}[{index}]",
                                       blocks=blocks.name)
        return dataclasses.replace(self._slice(base, index), name=name)

    @staticmethod
    def _slice(base: TensorInfo, index: int) -> TensorInfo:
        """Slice ``index`` along dim 0 of a stored (unquantised) tensor, read in place."""
        size = base.nbytes // base.shape[0]
        return dataclasses.replace(base, name=f"{base.name}[{index}]", shape=base.shape[1:], nbytes=size,
                                   offset=base.offset + index * size)

    def _stored_info(self, name: str) -> TensorInfo:
        """A stored tensor (scales and blocks included) or a slice of one; else the logical one."""
        if name in self._stored:
            return self._stored[name]
        sliced = stacked_slice(name)
        if sliced and sliced[0] in self._stored and sliced[0] not in self.tensors:
            base = self._stored[sliced[0]]
            if not base.shape or not 0 <= sliced[1] < base.shape[0]:
                raise CheckpointError(f"{self.dir}: {name}: {sliced[0]} has shape {list(base.shape)}; "
                                      f"no slice {sliced[1]} along dim 0")
            return self._slice(base, sliced[1])
        info = self.info(name)
        if info.blocks:
            raise CheckpointError(f"{self.dir}: {name} is stored as MXFP4 ({info.blocks}, {info.scale}); read it "
                                  "with get() (dequantised), or read the blocks and scales by their own names")
        return info

    def location(self, name: str) -> tuple[int, int]:
        """``(open file descriptor, byte offset)`` of a stored tensor's data, for file-to-file copies."""
        info = self._stored_info(name)
        return self._handle(info.file).fileno(), info.offset

    def raw(self, name: str) -> torch.Tensor:
        """The stored tensor (FP8 stays FP8; MXFP4 blocks and scales by their own names), copied into memory."""
        info = self._stored_info(name)
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
        """The logical tensor: FP8 weights are block-dequantised to bf16, MXFP4 pairs dequantised to
        bf16 in transformers' layout; ``"x[E]"`` as in ``info``."""
        info = self.info(name)
        if info.scale is None:
            return self.raw(name)
        if info.blocks:
            from kernels import mxfp4_dequant

            return mxfp4_dequant(self.raw(info.blocks), self.raw(info.scale), layout="transformers")
        from kernels import fp8_block_dequant

        return fp8_block_dequant(self.raw(name), self.raw(info.scale).float(), self.block_size)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
