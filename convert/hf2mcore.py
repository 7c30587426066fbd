"""HF safetensors -> Megatron-Core ``torch_dist``, streaming, on one or many ranks.

Output layout (what Megatron-LM's ``--load`` and our trainer expect)::

    OUT/latest_checkpointed_iteration.txt   "release"   <- written last: the completion marker
    OUT/release/                            torch_dist checkpoint (metadata.json, .metadata, *.distcp)
    OUT/hf/                                 config.json, generation config, tokenizer files
    OUT/megatron_lm_args.txt                the pretrain_gpt.py model flags that load it

Steps: plan from config.json and shard headers (no tensor data); split the MCore tensors across
ranks by bytes; each rank reads only the HF tensors its entries need, applies the rule, and
appends the chunks to its own ``.distcp`` file; rank 0 writes the metadata and the marker.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from convert.formats import outdir
from convert.comm import Comm, assign_by_bytes
from convert.formats.byte_ranges import hf_ranges
from convert.journal import Journal, fingerprint, input_identity
from convert.formats.outdir import OutputError
from convert.hugepages import use_huge_pages
from convert.formats.hf_checkpoint import HFCheckpoint
from convert.megatron_args import common_state, flag_lines, megatron_args
from convert.conversion_plan import (build_plan, check_hf_names, check_hf_shapes, hf_view, mtp_hf_names, output_dtype,
                                     read_model, resolve_mtp)
from convert.progress import Progress, human_bytes
from convert.formats.torch_dist import piece_of
from convert.formats.torch_dist_writer import Writer, finalize
from mapping import rules as R
from mapping.layout import per_layer_keys

PROGRESS = ".progress"
ARGS_FILE = "megatron_lm_args.txt"
ARGS_HEADER = ("# Megatron-LM model flags for this checkpoint (pretrain_gpt.py ... --load OUT); the same\n"
               "# arguments are stored in release/common.pt for --use-checkpoint-args.\n")
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
                 "chat_template.jinja", "added_tokens.json")


def open_input(hf_dir: str, spec: str = "local", dtype: str = "auto", mtp: str = "auto"):
    """``(checkpoint, plan, info)`` for an HF folder: everything checked before a byte is written.
    ``info``: ``target`` dtype, ``fp8_input``, ``mtp`` status and the ``notes`` to print."""
    ck = HFCheckpoint(hf_dir)
    fp8_input = any(i.scale for i in ck.tensors.values())
    target = output_dtype(dtype, "bfloat16" if fp8_input
                          else ck.config.get("torch_dtype") or ck.config.get("dtype") or "float32")
    source = str(Path(hf_dir) / "config.json")
    family, model = read_model(ck.config, source)
    mtp_names = mtp_hf_names(family, model)
    mtp_status = resolve_mtp(mtp, mtp_names, ck.tensors.keys(), str(hf_dir))
    plan = build_plan(ck.config, target, spec, source=source, mtp=mtp_status == "present")
    dropped = set(mtp_names) if mtp_status == "dropped" else set()
    view = hf_view(plan, [n for n in ck.names() if n not in dropped], ck.info)
    check_hf_names(plan, view)
    check_hf_shapes(plan, view, source=f"{hf_dir}: ")
    flags = flag_lines(megatron_args(plan.model, target))
    comments = [ln.lstrip("# ") for ln in flags if ln.startswith("#")]
    notes = (list(plan.model.notes) + _mtp_notes(mtp_status, len(mtp_names), len(dropped & set(ck.names())))
             + ([f"Megatron-LM: {' '.join(comments)}"] if comments else []))
    return ck, plan, {"target": target, "fp8_input": fp8_input, "mtp": mtp_status, "notes": notes, "flags": flags}


def dry_run(hf_dir: str, out: str, ranks: list[int], *, spec: str = "local", dtype: str = "auto",
            mtp: str = "auto") -> list[dict]:
    """The plan for each rank count in ``ranks`` (planned once), from config.json and the index."""
    _, plan, info = open_input(hf_dir, spec, dtype, mtp)
    sizes = [plan.entry_bytes(e) for e in plan.entries]
    return [dict(describe(plan, assign_by_bytes(sizes, n), n, out), mtp=info["mtp"], notes=info["notes"])
            for n in ranks]


def run(hf_dir: str, out: str, *, spec: str = "local", dtype: str = "auto", overwrite: bool = False,
        comm: Comm = Comm(), mtp: str = "auto") -> dict:
    t0 = time.time()
    use_huge_pages()  # before the first large tensor is allocated
    ck, plan, info = open_input(hf_dir, spec, dtype, mtp)
    target, fp8_input, mtp_status = info["target"], info["fp8_input"], info["mtp"]
    owners = assign_by_bytes([plan.entry_bytes(e) for e in plan.entries], comm.size)
    mine = [e for e, r in zip(plan.entries, owners) if r == comm.rank]
    out = Path(out)
    fp = fingerprint("hf2mcore", spec, str(target), comm.size, mtp_status, input_identity(Path(hf_dir)))
    resume = outdir.prepare(out, overwrite=overwrite, kind="hf2mcore", subdir="release",
                            fingerprint=fp) if comm.rank == 0 else None
    resume = comm.bcast(resume)
    ckpt_dir = out / "release"
    with outdir.writing(out):
        records = comm.allgather(_write_rank(plan, ck, mine, ckpt_dir, comm, resume))
    if comm.rank == 0:
        with outdir.writing(out):
            finalize(ckpt_dir, [p for ps in plan.pieces.values() for p in ps], plan.objects,
                     [r for rs in records for r in rs], common=common_state(plan.model, target))
            copy_side_files(Path(hf_dir), out / "hf", dequantised=fp8_input)
            (out / ARGS_FILE).write_text(ARGS_HEADER + "\n".join(info["flags"]) + "\n")
            shutil.rmtree(ckpt_dir / PROGRESS, ignore_errors=True)
            outdir.mark_complete(out, record={"family": plan.family.name, "spec": spec, "mtp": mtp_status,
                                              "layers": _layers(plan)})
    comm.barrier()
    nbytes = sum(plan.entry_bytes(e) for e in plan.entries)
    return {"tensors": len(plan.entries), "bytes": nbytes, "seconds": time.time() - t0,
            "output": str(out), "family": plan.family.name, "dtype": str(target).replace("torch.", ""),
            "mtp": mtp_status, "notes": info["notes"]}


def _layers(plan) -> str:
    return "per-layer" if per_layer_keys(plan.model.transformer) else "stacked"


def _mtp_notes(status: str, declared: int, dropped: int) -> list[str]:
    if status == "absent":
        return [f"config.json declares MTP layers but none of their {declared} tensors are stored (as in "
                "copies saved by transformers): converted without MTP (recorded as mtp: absent; do not pass "
                "--mtp-num-layers to Megatron-LM)"]
    if status == "dropped":
        return [f"--mtp drop: {dropped} MTP tensors left out; the checkpoint has no MTP layers"]
    return []


def _write_rank(plan, ck, mine, ckpt_dir: Path, comm: Comm, resume: bool) -> list:
    """Convert this rank's entries into its own ``.distcp`` file, journaling each one."""
    journal = Journal(ckpt_dir / PROGRESS / f"rank{comm.rank}.jsonl", resume)
    done = journal.entries
    writer = Writer(ckpt_dir, comm.rank, resume_at=done[-1]["offset"] if done else 0,
                    records=[r for d in done for r in d["records"]])
    steps = [(e.mcore, e) for e in mine] + ([("<objects>", None)] if comm.rank == 0 else [])
    try:
        _write_steps(plan, ck, steps, done, writer, journal, ckpt_dir, comm)
    except BaseException:
        writer.abort()
        journal.close()
        raise
    journal.close()
    return writer.close()


def _write_steps(plan, ck, steps, done, writer, journal, ckpt_dir, comm) -> None:
    mine = [e for _, e in steps if e is not None]
    with Progress(sum(plan.entry_bytes(e) for e in mine), f"hf2mcore rank {comm.rank}",
                  enabled=comm.rank == 0) as bar:
        for i, (name, e) in enumerate(steps):
            if i < len(done):
                if done[i]["name"] != name:
                    raise OutputError(f"{ckpt_dir}: progress journal disagrees with the plan at {name}; "
                                      "delete the output and re-run")
                bar.update(plan.entry_bytes(e) if e else 0)
                continue
            before = writer.count
            if e is None:
                for obj in plan.objects:
                    writer.write_object(obj)
            elif (ranges := hf_ranges(plan, ck, e)) is not None:  # rows only move: file to file
                for piece, rs in zip(plan.pieces[e.mcore], ranges):
                    writer.write_copied(piece, rs)
                bar.update(plan.entry_bytes(e))
            else:
                t = R.to_mcore(e.rule, [ck.get(h) for h in e.hf], plan.model.shapes).to(plan.dtypes[e.mcore])
                for piece in plan.pieces[e.mcore]:
                    writer.write_tensor(piece, piece_of(t, piece))
                del t
                bar.update(plan.entry_bytes(e))
            journal.append({"name": name, "offset": writer.tell(), "records": writer.records_since(before)})


def copy_side_files(src: Path, dst: Path, dequantised: bool = False) -> None:
    """Config, generation config and tokenizer, so later steps need nothing but OUT. After FP8
    dequantisation ``quantization_config`` goes: transformers would treat the weights as FP8."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if dequantised:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def describe(plan, owners, ranks, out) -> dict:
    per_rank = [0] * ranks
    counts = [0] * ranks
    for e, r in zip(plan.entries, owners):
        per_rank[r] += plan.entry_bytes(e)
        counts[r] += 1
    mean = sum(per_rank) / ranks
    largest = max(plan.entry_bytes(e) for e in plan.entries)
    return {"family": plan.family.name, "tensors": len(plan.entries), "bytes": sum(per_rank),
            "ranks": ranks, "rank_bytes": per_rank, "rank_tensors": counts,
            "imbalance": max(per_rank) / mean if mean else 1.0,
            "largest_tensor_bytes": largest, "expected_peak_bytes_per_rank": 3 * largest,
            "output": str(out), "checkpoint_keys": len({p.key for ps in plan.pieces.values() for p in ps}),
            "layers": _layers(plan),
            "human": human_bytes(sum(per_rank))}
