"""Megatron-Core ``torch_dist`` -> HF safetensors, streaming, on one or many ranks.

Reads ``MCORE/hf/config.json`` (or ``--hf-config DIR``) to pick the family and rebuild the plan,
lays out the HF tensors into shards of at most ``--max-shard-size`` (all HF tensors made from one
MCore tensor stay in one shard), and streams each shard: header first, then tensor by tensor.
Shards are split across ranks by bytes. Rank 0 copies config and tokenizer files first and
writes ``model.safetensors.index.json`` (with ``metadata.total_size``) last: the index is the
completion marker transformers and vLLM look for.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from convert import lora_export
from convert.formats import outdir
from convert.fp8_export import export_for
from convert.comm import Comm, assign_by_bytes
from convert.formats.byte_ranges import close_all, mcore_ranges
from convert.hf2mcore import copy_side_files
from convert.hugepages import use_huge_pages
from convert.journal import fingerprint, input_identity
from convert.conversion_plan import plan_for_checkpoint
from convert.formats.te_layout import TE_MARKER
from convert.progress import Progress
from convert.formats.safetensors_stream import StreamingSafetensors, nbytes, stacked_specs
from convert.formats.torch_dist import Reader, TorchDistError
from mapping import rules as R
from mapping.rules import stacked_slice

INDEX = "model.safetensors.index.json"
# Training checkpoints also hold optimizer / RNG state: not part of the model, not exported.
NON_MODEL_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine", "chained_", lora_export.PREFIX)


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


def shard_layout(plan, max_bytes: int):
    """Consecutive entries packed into shards; returns [[entry, ...], ...]. The slices of a tensor
    stacking all experts (``mapping.rules.EXPERT_SLICE``) stay in one shard."""
    shards, cur, size = [], [], 0
    for e in plan.entries:
        outs = plan.hf_outputs(e)
        b = sum(nbytes(s, d) for _, s, d in outs)
        continues = any((stacked_slice(n) or (None, 0))[1] > 0 for n, _, _ in outs)
        if cur and size + b > max_bytes and not continues:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += b
    if cur:
        shards.append(cur)
    return shards


def run(mcore_dir: str, out: str, *, hf_config: str | None = None, max_shard_size: str = "5GB",
        overwrite: bool = False, comm: Comm = Comm(), dtype: str = "auto", lora: str = "none") -> dict:
    """``dtype``: "auto" (the checkpoint's own dtype) or "fp8" (``convert.fp8_export``); ``lora``: "none"
    (a checkpoint holding LoRA adapters is refused), "only" (a PEFT adapter directory) or "merge" (the
    merged model; ``convert.lora_export``)."""
    t0 = time.time()
    use_huge_pages()  # before the first large tensor is allocated
    root = Path(mcore_dir)
    ckpt = outdir.checkpoint_dir(root)
    cfg_dir = Path(hf_config) if hf_config else root / "hf"
    if not (cfg_dir / "config.json").is_file():
        raise TorchDistError(f"{cfg_dir / 'config.json'}: missing; pass --hf-config DIR with the model's config.json")
    config = json.loads((cfg_dir / "config.json").read_text())
    reader = Reader(ckpt)
    stored = reader.tensor_meta("embedding.word_embeddings.weight").properties.dtype
    plan, notes = _plan_for(config, stored, reader, source=str(cfg_dir / "config.json"))
    export = export_for(dtype, plan.family)
    held = lora_export.lora_keys(reader)
    if held and lora == "none":
        raise TorchDistError(f"{ckpt}: holds {len(held)} LoRA adapter tensors (e.g. {held[0]}); pass --lora-only "
                             "for a PEFT adapter directory or --merge-lora for the merged model")
    if lora != "none" and not held:
        raise TorchDistError(f"{ckpt}: --lora-only / --merge-lora, but the checkpoint holds no LoRA adapters")
    if lora == "only":
        return _peft_only(plan, reader, ckpt, Path(out), overwrite, comm, t0, notes)
    if lora == "merge":
        export = lora_export.MergeLoRA(export, plan, reader, lora_export.lora_config(ckpt))
    shards = shard_layout(plan, parse_size(max_shard_size))
    specs = [stacked_specs(export.specs([o for e in s for o in plan.hf_outputs(e)])) for s in shards]
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    sizes = [sum(plan.entry_bytes(e) for e in s) for s in shards]
    owners = assign_by_bytes(sizes, comm.size)
    out = Path(out)
    fp = fingerprint("mcore2hf", max_shard_size, dtype, input_identity(ckpt), input_identity(cfg_dir))  # any ranks
    resume = None
    if comm.rank == 0:
        resume = outdir.prepare(out, overwrite=overwrite, kind="mcore2hf", fingerprint=fp)
        with outdir.writing(out):
            copy_side_files(cfg_dir, out)
            (out / "config.json").write_text(json.dumps(export.config(json.loads((out / "config.json").read_text())),
                                                        indent=2) + "\n")
    resume = comm.bcast(resume)
    mine = [i for i, r in enumerate(owners) if r == comm.rank]
    with Progress(sum(sizes[i] for i in mine), f"mcore2hf rank {comm.rank}", enabled=comm.rank == 0) as bar:
        for i in mine:
            if not (resume and (out / names[i]).is_file()):  # a finished shard is renamed into place
                with outdir.writing(out):
                    _write_shard(plan, reader, shards[i], specs[i], export, out / names[i])
            bar.update(sizes[i])
    comm.barrier()
    weight_map = {name: names[i] for i, shard in enumerate(specs) for name, _, _ in shard}
    total = sum(nbytes(sh, d) for shard in specs for _, sh, d in shard)
    if comm.rank == 0:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        tmp = out / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        tmp.replace(out / INDEX)
        outdir.finish(out)
    comm.barrier()
    return {"tensors": len(weight_map), "bytes": total, "files": n, "seconds": time.time() - t0,
            "output": str(out), "family": plan.family.name, "dtype": dtype,
            "spec": plan.spec, "notes": notes}


def _peft_only(plan, reader, ckpt: Path, out: Path, overwrite: bool, comm: Comm, t0: float, notes) -> dict:
    """--lora-only: rank 0 writes the PEFT adapter directory (adapters are megabytes)."""
    res = {"tensors": 0, "bytes": 0}
    if comm.rank == 0:
        config = lora_export.lora_config(ckpt)
        outdir.prepare(out, overwrite=overwrite, kind="mcore2hf-lora", fingerprint="")
        with outdir.writing(out):
            res = lora_export.write_peft(plan, reader, config, out)
        outdir.finish(out)
    comm.barrier()
    return {**res, "files": 2, "seconds": time.time() - t0, "output": str(out), "family": plan.family.name,
            "dtype": "auto", "spec": plan.spec, "notes": notes}


def _plan_for(config: dict, dtype, reader, source: str):
    """The plan of the spec the checkpoint was written for (TE's final norm has ``_extra_state``),
    with MTP layers if it stores them; and the notes to print."""
    keys = reader.keys()
    plan, notes = plan_for_checkpoint(config, dtype, keys, "te" if TE_MARKER in keys else "local", source)
    _check_keys(plan, reader)
    return plan, notes


def _check_keys(plan, reader) -> None:
    want = {p.key for ps in plan.pieces.values() for p in ps}
    have = {k for k in reader.keys() if "/shard_" not in k}
    if missing := sorted(want - have):
        raise TorchDistError(f"{reader.dir}: {len(missing)} tensors the {plan.family.name} config needs are "
                             f"missing from the checkpoint, e.g. {missing[:3]}; wrong --hf-config?")
    if extra := sorted(k for k in have - want
                       if not k.endswith("_extra_state") and not k.startswith(NON_MODEL_PREFIXES)):
        raise TorchDistError(f"{reader.dir}: {len(extra)} checkpoint tensors no rule maps, e.g. {extra[:3]}")


def _write_shard(plan, reader, entries, specs, export, path: Path) -> None:
    fds: dict = {}
    try:
        with StreamingSafetensors(path, specs) as w:
            for e in entries:
                outputs = plan.hf_outputs(e)
                if not export.quantises(outputs) and (ranges := mcore_ranges(plan, reader, e, fds)) is not None:
                    for (name, _, _), rs in zip(outputs, ranges):  # rows only move
                        w.write_copied(name, rs)
                    continue
                t = reader.read_param(plan.pieces[e.mcore], plan.shapes[e.mcore])
                for (name, _, dtype), ht in zip(outputs, R.to_hf(e.rule, t, plan.model.shapes)):
                    export.write(w, name, ht.to(dtype))
    finally:
        close_all(fds)
