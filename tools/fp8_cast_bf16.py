"""Cast a DeepSeek block-FP8 checkpoint (V3/R1 layout) to a BF16 Hugging Face checkpoint.

Every ``float8_e4m3fn`` weight ``W`` with its fp32 ``W_scale_inv`` (one scale per 128x128 block)
becomes ``bf16(W * scale)`` (``kernels.fp8_block_dequant``: fp32 multiply, round to nearest even;
bitwise the reference); every other tensor is copied unchanged, dtype included. Output shards keep
the input's file names, the index loses its ``*_scale_inv`` entries and gets the new
``metadata.total_size``, ``config.json`` loses ``quantization_config`` (transformers refuses a
BF16 model that still declares FP8), and every other file (tokenizer, generation config, code,
README, sub-folders) is copied. ``--drop-mtp`` also drops the multi-token-prediction layer
(``model.layers.{num_hidden_layers}.*`` and above) and sets ``num_nextn_predict_layers: 0``.

How it runs: the input's index and shard headers are read first and the whole plan is checked
before anything is written, so a broken checkpoint fails in a second with one line naming the
tensor or file and the fix. Shards are then written tensor by tensor (header first, then bytes),
so memory stays around two copies of the largest tensor, not a shard. A weight's scale may live
in another shard: that shard is opened lazily (memory-mapped) when needed. Under ``mpiexec -n N``
or ``torchrun --nproc-per-node N`` the shards are split across ranks by bytes (largest first
onto the least loaded rank); each rank writes its own files; rank 0 writes the index and config
after a barrier. The result does not depend on N, byte for byte.

Never a complete-looking partial output: everything is written into ``OUT.tmp-fp8cast`` (a
stale one from a crashed run is removed first) and renamed to ``OUT`` only when complete.
The input is only read.

Leaves out: hf2mcore's FP8 input (``convert``), e5m2 or per-channel formats, non-square blocks,
the ``modeling_*.py`` quantisation code paths (copied as they are). Without it, DeepSeek FP8
checkpoints need the published single-GPU (sm89+) script, which also keeps
``quantization_config`` and a stale ``total_size``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from convert.comm import Comm, MPIComm, TorchComm, assign_by_bytes, from_launcher
from convert.formats import INDEX, SCALE_SUFFIX, SINGLE, CheckpointError, HFCheckpoint
from convert.progress import Progress, human_bytes
from convert.formats import StreamingSafetensors

TMP_SUFFIX = ".tmp-fp8cast"
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class CastError(ValueError):
    """The cast cannot start; the message names the file/tensor/flag and what to do."""


@dataclass(frozen=True)
class CastPlan:
    """What is written where, decided from headers alone; identical on every rank."""

    files: dict[str, tuple[str, ...]]
    """Output shard name -> tensor names in write order (shards left empty are absent)."""
    empty_files: tuple[str, ...]
    """Input shards with nothing left to write (only scales, or only MTP tensors)."""
    dequantised: int
    """Number of FP8 weights that become bf16 (and scales dropped)."""
    dropped_mtp: tuple[str, ...]
    """Tensors of the MTP layer dropped by ``--drop-mtp``."""
    total_size: int
    """Sum of output tensor bytes: the index's ``metadata.total_size``."""


def check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse output locations that would touch the input or silently replace something."""
    if not src.is_dir():
        raise CastError(f"--in {src}: not a directory; pass the folder holding config.json and the shards")
    s, d = src.resolve(), dst.resolve()
    if s == d:
        raise CastError(f"--out {dst} is the input folder; the input is never modified: choose another --out")
    if s in d.parents or d in s.parents:
        raise CastError(f"--out {dst} and --in {src} are nested; choose an --out outside the input folder")
    if dst.exists() and not overwrite:
        raise CastError(f"--out {dst} already exists; pass --overwrite to replace it, or choose another --out")


def _check_quant_config(ckpt: HFCheckpoint) -> None:
    q = ckpt.config.get("quantization_config")
    if q is None:
        return
    if q.get("quant_method") != "fp8":
        raise CastError(f"{ckpt.dir / 'config.json'}: quantization_config.quant_method is "
                        f"{q.get('quant_method')!r}, not 'fp8'; this tool casts DeepSeek block-FP8 checkpoints only")
    block = q.get("weight_block_size") or [128, 128]
    if len(block) != 2 or block[0] != block[1]:
        raise CastError(f"{ckpt.dir / 'config.json'}: weight_block_size {block} is not square; "
                        "only square blocks (DeepSeek's [128, 128]) are supported")


def _shard_files(ckpt: HFCheckpoint) -> list[str]:
    """Every shard the checkpoint consists of; stray *.safetensors files are an error."""
    index = ckpt.dir / INDEX
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SINGLE]
    stray = sorted(p.name for p in ckpt.dir.glob("*.safetensors") if p.name not in shards)
    if stray:
        raise CastError(f"{ckpt.dir / stray[0]}: a safetensors file the checkpoint's index does not list; "
                        "remove it from the input folder or add its tensors to the index")
    return shards


def _mtp_names(ckpt: HFCheckpoint) -> set[str]:
    layers = ckpt.config.get("num_hidden_layers")
    if not isinstance(layers, int):
        raise CastError(f"{ckpt.dir / 'config.json'}: no integer num_hidden_layers, needed by --drop-mtp "
                        "to find the MTP layer; fix the config or drop --drop-mtp")
    return {n for n in ckpt.tensors if (m := LAYER.match(n)) and int(m.group(1)) >= layers}


def plan_cast(ckpt: HFCheckpoint, drop_mtp: bool) -> CastPlan:
    _check_quant_config(ckpt)
    shards = _shard_files(ckpt)
    for info in ckpt.tensors.values():
        if info.scale is None and info.dtype.itemsize == 1 and info.dtype.is_floating_point:
            raise CastError(f"{info.name}: {info.dtype} without a block scale; only float8_e4m3fn "
                            f"weights with a {SCALE_SUFFIX} companion can be cast")
    mtp = _mtp_names(ckpt) if drop_mtp else set()
    files: dict[str, list[str]] = {f: [] for f in shards}
    total = 0
    for name in sorted(ckpt.tensors):
        if name in mtp:
            continue
        info = ckpt.tensors[name]
        files[info.file].append(name)
        total += info.nbytes * info.out_dtype.itemsize // info.dtype.itemsize
    return CastPlan(files={f: tuple(n) for f, n in files.items() if n},
                    empty_files=tuple(f for f, n in files.items() if not n),
                    dequantised=sum(1 for n, i in ckpt.tensors.items() if i.scale and n not in mtp),
                    dropped_mtp=tuple(sorted(mtp)), total_size=total)


def _out_bytes(ckpt: HFCheckpoint, names) -> int:
    return sum(ckpt.tensors[n].nbytes * ckpt.tensors[n].out_dtype.itemsize // ckpt.tensors[n].dtype.itemsize
               for n in names)


def write_shard(ckpt: HFCheckpoint, names: tuple[str, ...], path: Path, progress: Progress) -> None:
    """One output shard, tensor by tensor: FP8 weights dequantised, the rest copied as stored."""
    specs = [(n, ckpt.tensors[n].shape, ckpt.tensors[n].out_dtype) for n in names]
    with StreamingSafetensors(path, specs) as writer:
        for name in names:
            t = ckpt.get(name)  # bf16 for FP8 weights (their scale's shard opened lazily), else as stored
            writer.write(name, t)
            progress.update(t.numel() * t.element_size())


def _cast_config(config: dict, drop_mtp: bool) -> dict:
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    if drop_mtp:
        out["num_nextn_predict_layers"] = 0
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def finalize(ckpt: HFCheckpoint, plan: CastPlan, tmp: Path, drop_mtp: bool) -> None:
    """Rank 0, after every shard is written: index, config, every other file."""
    index_in = ckpt.dir / INDEX
    if index_in.is_file():
        index = json.loads(index_in.read_text())
        weight_map = {n: f for f, names in plan.files.items() for n in names}
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": plan.total_size}
        index["weight_map"] = dict(sorted(weight_map.items()))
        _write_json(tmp / INDEX, index)
    _write_json(tmp / "config.json", _cast_config(ckpt.config, drop_mtp))
    skip = {INDEX, "config.json"}
    for src in sorted(ckpt.dir.iterdir()):
        if src.name in skip or src.name.endswith(".safetensors"):
            continue
        if src.is_dir():
            shutil.copytree(src, tmp / src.name)
        else:
            shutil.copy2(src, tmp / src.name)


def tmp_dir(dst: Path) -> Path:
    """Where a cast into ``dst`` is assembled before it is renamed into place."""
    return dst.with_name(dst.name + TMP_SUFFIX)


def _prepare_tmp(dst: Path) -> Path:
    tmp = tmp_dir(dst)
    if tmp.exists():
        shutil.rmtree(tmp)  # a crashed earlier run: never complete, safe to discard
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, dst: Path) -> None:
    if dst.exists():  # --overwrite was given (checked before anything was written)
        shutil.rmtree(dst)
    os.rename(tmp, dst)


def _write_my_shards(ckpt: HFCheckpoint, plan: CastPlan, comm: Comm, tmp: Path) -> dict:
    names = sorted(plan.files)
    owner = assign_by_bytes([_out_bytes(ckpt, plan.files[f]) for f in names], comm.size)
    mine = [f for f, r in zip(names, owner) if r == comm.rank]
    nbytes = sum(_out_bytes(ckpt, plan.files[f]) for f in mine)
    desc = "fp8 -> bf16" if comm.size == 1 else f"fp8 -> bf16 (rank 0 of {comm.size})"
    with Progress(nbytes, desc, enabled=comm.rank == 0) as progress:
        for f in mine:
            write_shard(ckpt, plan.files[f], tmp / f, progress)
    return {"files": len(mine), "tensors": sum(len(plan.files[f]) for f in mine), "bytes": nbytes}


def run(args: argparse.Namespace, comm: Comm) -> dict:
    """The whole cast on this rank; returns the summary (all ranks' counts) on every rank."""
    t0 = time.perf_counter()
    src, dst = Path(args.in_dir), Path(args.out_dir)
    check_paths(src, dst, args.overwrite)
    ckpt = HFCheckpoint(src)
    plan = plan_cast(ckpt, args.drop_mtp)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // comm.size))
    tmp = tmp_dir(dst)
    if comm.rank == 0:
        _prepare_tmp(dst)
    comm.barrier()
    try:
        mine = _write_my_shards(ckpt, plan, comm, tmp)
    except BaseException:
        if isinstance(comm, MPIComm) and comm.size > 1:  # peers would wait at the barrier forever
            import traceback
            traceback.print_exc()
            from mpi4py import MPI
            MPI.COMM_WORLD.Abort(1)
        if comm.size == 1:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ckpt.close()
    stats = comm.allgather(mine)
    if comm.rank == 0:
        finalize(ckpt, plan, tmp, args.drop_mtp)
        _publish(tmp, dst)
    comm.barrier()
    return {"files": sum(s["files"] for s in stats), "tensors": sum(s["tensors"] for s in stats),
            "bytes": sum(s["bytes"] for s in stats), "dequantised": plan.dequantised,
            "dropped_mtp": len(plan.dropped_mtp), "empty_files": len(plan.empty_files),
            "ranks": comm.size, "seconds": time.perf_counter() - t0, "out": str(dst)}


EPILOG = """\
examples:
  python -m tools.fp8_cast_bf16 --in DeepSeek-V3 --out DeepSeek-V3-bf16
  python -m tools.fp8_cast_bf16 --in DeepSeek-V3 --out DeepSeek-V3-bf16 --drop-mtp
  mpiexec -n 8 python -m tools.fp8_cast_bf16 --in DeepSeek-V3 --out DeepSeek-V3-bf16
  torchrun --nproc-per-node 8 -m tools.fp8_cast_bf16 --in DeepSeek-V3 --out DeepSeek-V3-bf16

stops before writing anything (exit code 2, one line naming the tensor/file and the fix) when:
  - an FP8 weight has no W_scale_inv, a scale has no weight, or a scale's shape is not
    [ceil(rows/B), ceil(cols/B)];
  - --out exists (add --overwrite), is the input, or is nested with it;
  - the index and the shards disagree, a shard is missing or truncated, or a *.safetensors
    file is not in the index.

speed: the CPU dequant runs near memory speed (python -m tools.bench_dequant); on one node
the cast is bound by disk reads and writes. Threads per rank: cores / ranks unless --threads.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.fp8_cast_bf16", description=__doc__.split("\n\nLeaves out")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="in_dir", required=True, metavar="DIR",
                   help="DeepSeek FP8 checkpoint folder (config.json, *.safetensors, index); only read")
    p.add_argument("--out", dest="out_dir", required=True, metavar="DIR",
                   help="BF16 checkpoint folder to create (must not exist unless --overwrite)")
    p.add_argument("--drop-mtp", action="store_true",
                   help="drop the MTP layer (model.layers.{num_hidden_layers}.*) and set num_nextn_predict_layers: 0")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per rank (default: cores / ranks)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = from_launcher()
    try:
        s = run(args, comm)
    except (CastError, CheckpointError) as err:
        if comm.rank == 0:
            fix = "; nothing was written: repair or re-download the input, then re-run" \
                if isinstance(err, CheckpointError) else ""
            print(f"fp8_cast_bf16: error: {err}{fix}", file=sys.stderr)
        return 2
    finally:
        if isinstance(comm, TorchComm):  # torchrun: a live gloo group at exit aborts the process
            torch.distributed.destroy_process_group()
    if comm.rank == 0:
        extra = f", {s['dropped_mtp']} MTP tensors dropped" if s["dropped_mtp"] else ""
        print(f"fp8_cast_bf16: wrote {s['files']} files, {s['tensors']} tensors ({s['dequantised']} dequantised, "
              f"{s['dequantised']} scales dropped{extra}), {human_bytes(s['bytes'])} in {s['seconds']:.1f} s "
              f"({human_bytes(s['bytes'] / max(s['seconds'], 1e-9))}/s) on {s['ranks']} rank(s) -> {s['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
