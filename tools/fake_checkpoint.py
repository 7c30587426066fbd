"""Fabricate a full-size HF checkpoint *without weights*: real names, shapes, dtypes and shard
layout, in sparse files (headers only; the data regions are holes that take no disk space).

Used to plan and dry-run conversions of models this machine cannot hold, e.g. DeepSeek-V3-671B
from its published config.json (``tools/configs/deepseek_v3_671b.json``, FP8 with block scales).
Reading a tensor of such a checkpoint returns zeros: it is for planning, never for conversion.

    python -m tools.fake_checkpoint --config tools/configs/deepseek_v3_671b.json --out /tmp/dsv3
    python -m convert hf2mcore --hf-dir /tmp/dsv3 --out /tmp/x --dry-run --ranks 32
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import time
from pathlib import Path

import torch

from convert.formats import transformers_config
from convert.formats import ST_NAMES
from tools.tiny_weights import plan_shards, tensor_specs

SHARD_BYTES = 4_300_000_000  # DeepSeek-V3's published shards are ~4.3 GB (163 files)


def _header(entries) -> bytes:
    header, offset = {}, 0
    for name, size, spec in entries:
        shape, dtype = spec.stored_shapes()[name]
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), offset


def fake_checkpoint(config_path: str | Path, out: str | Path, shard_bytes: int = SHARD_BYTES) -> dict:
    published = json.loads(Path(config_path).read_text())
    quant = (published.get("quantization_config") or {}).get("quant_method")
    dtype = getattr(torch, str(published.get("torch_dtype", "bfloat16")))
    config = transformers_config(published, dtype)
    specs = tensor_specs(config, dtype, quant == "fp8", quant == "mxfp4")
    plan = plan_shards(specs, shard_bytes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for k, entries in enumerate(plan, start=1):
        fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        raw, size = _header(entries)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
        os.truncate(out / fname, 8 + len(raw) + size)  # sparse: no data blocks allocated
        weight_map.update({name: fname for name, _, _ in entries})
        total += size
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(published, indent=2))
    return {"files": len(plan), "tensors": len(weight_map), "bytes": total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.fake_checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a published config.json")
    p.add_argument("--out", required=True, help="output folder (sparse files; ~no disk used)")
    p.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1e9, help="bytes per shard, in GB")
    a = p.parse_args(argv)
    t0 = time.time()
    res = fake_checkpoint(a.config, a.out, int(a.shard_gb * 1e9))
    print(f"fake_checkpoint: {res['tensors']} tensors in {res['files']} sparse files, "
          f"{res['bytes'] / 1e9:.1f} GB logical, {time.time() - t0:.1f}s -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
