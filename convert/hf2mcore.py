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
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from convert.formats import outdir
from convert.comm import Comm, assign_by_bytes
from convert.formats.byte_ranges import hf_ranges
from convert.formats.filecopy import Writeback
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
from mapping.entries import expand
from mapping.layout import per_layer_keys
from mapping.row_trace import ZERO, row_block, rule_rows, slice_runs

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
    entries = expand(family.rules(model), model)
    mtp_names = mtp_hf_names(family, model, entries)
    mtp_status = resolve_mtp(mtp, mtp_names, ck.tensors.keys(), str(hf_dir))
    with_mtp = mtp_status in ("present", "none")
    plan = build_plan(ck.config, target, spec, source=source, mtp=mtp_status == "present",
                      expanded=entries if with_mtp else None)
    dropped = set(mtp_names) if mtp_status == "dropped" else set()
    view = hf_view(plan, [n for n in ck.names() if n not in dropped], ck.info)
    check_hf_names(plan, view)
    check_hf_shapes(plan, view, source=f"{hf_dir}: ")
    flags = flag_lines(megatron_args(plan.model, target))
    if plan.family.megatron_lm_gap:  # the flags alone do not build this model: say so where they are read
        flags = [f"# NOT ENOUGH for pretrain_gpt.py: {plan.family.megatron_lm_gap}", *flags]
    comments = [ln.lstrip("# ") for ln in flags if ln.startswith("#")]
    notes = (list(plan.model.notes) + _mtp_notes(mtp_status, len(mtp_names), len(dropped & set(ck.names())))
             + ([f"Megatron-LM: {' '.join(comments)}"] if comments else []))
    return ck, plan, {"target": target, "fp8_input": fp8_input, "mtp": mtp_status, "notes": notes, "flags": flags}


def dry_run(hf_dir: str, out: str, ranks: list[int], *, spec: str = "local", dtype: str = "auto",
            mtp: str = "auto", throughput_gbs: Optional[float] = None, started: Optional[float] = None) -> list[dict]:
    """The plan for each rank count in ``ranks`` (planned once), from config.json and the index,
    with a predicted wall time per rank (``predict``). ``throughput_gbs``: GB/s one rank converts
    (default: ``probe_throughput``); ``started``: when the process started (``time.time()`` clock),
    so the start-up before planning counts in the fixed cost (default: planning only)."""
    t0 = time.time()
    ck, plan, info = open_input(hf_dir, spec, dtype, mtp)
    fixed = time.time() - (started or t0)
    rate = ({"gbs": throughput_gbs, "source": "--throughput-gbs"} if throughput_gbs
            else probe_throughput(ck, Path(out)))
    sizes = [plan.entry_bytes(e) for e in plan.entries]
    plans = []
    for n in ranks:
        owners = assign_by_bytes(sizes, n)
        plans.append(dict(describe(plan, owners, n, out), prediction=predict(plan, owners, n, rate, fixed),
                          mtp=info["mtp"], notes=info["notes"]))
    return plans


PROBE_BYTES = 64 << 20


def probe_throughput(ck: HFCheckpoint, out: Path, sample: int = PROBE_BYTES) -> dict:
    """GB/s of a copy on this machine: ``sample`` bytes read from the input's largest shard (its
    cached pages dropped first, so the read is cold where the kernel allows it) and written to a
    scratch file beside ``out`` (fsynced, then deleted). Sparse or cached inputs read faster than
    a real checkpoint on disk would: the probe says how much it read."""
    shard = max({i.file for i in ck.tensors.values()}, key=lambda f: (ck.dir / f).stat().st_size)
    where = next(p for p in [out, *out.parents] if p.is_dir())
    with open(ck.dir / shard, "rb", buffering=0) as f:
        size = min(sample, os.fstat(f.fileno()).st_size)
        os.posix_fadvise(f.fileno(), 0, size, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        data = f.read(size)
        t_read = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(dir=where, prefix=".hf2mcore-probe-") as g:
        t0 = time.perf_counter()
        g.write(data)
        g.flush()
        os.fsync(g.fileno())
        t_write = time.perf_counter() - t0
    return {"gbs": size / (t_read + t_write) / 1e9, "source": "probe", "probe_bytes": size,
            "read_gbs": size / t_read / 1e9, "write_gbs": size / t_write / 1e9,
            "probe_read": str(ck.dir / shard), "probe_wrote_in": str(where)}


def predict(plan, owners: list[int], ranks: int, rate: dict, fixed_s: float, top: int = 3) -> dict:
    """Predicted wall time per rank: ``fixed_s`` (start-up and planning, which every rank pays before
    its first byte) + the bytes it writes / ``rate["gbs"]`` (a copy's rate: each byte read once,
    written once). The slowest rank is the critical path; its largest tensors say what dominates."""
    gbs = rate["gbs"]
    per_rank: list[list] = [[] for _ in range(ranks)]
    for e, r in zip(plan.entries, owners):
        per_rank[r].append((plan.entry_bytes(e), e.mcore))
    seconds = [fixed_s + sum(b for b, _ in es) / (gbs * 1e9) for es in per_rank]
    slow = max(range(ranks), key=seconds.__getitem__)
    mine = sorted(per_rank[slow], reverse=True)
    data = sum(b for b, _ in mine)
    return {"throughput_gbs": gbs, "throughput": rate, "fixed_s": fixed_s, "rank_seconds": seconds,
            "wall_seconds": seconds[slow],
            "critical_path": {"rank": slow, "seconds": seconds[slow], "bytes": data, "tensors": len(mine),
                              "dominated_by": "data" if data / (gbs * 1e9) >= fixed_s else "start-up",
                              "largest_tensors": [{"name": n, "bytes": b, "seconds": b / (gbs * 1e9)}
                                                  for b, n in mine[:top]]}}


def run(hf_dir: str, out: str, *, spec: str = "local", dtype: str = "auto", overwrite: bool = False,
        comm: Comm = Comm(), mtp: str = "auto", started: Optional[float] = None) -> dict:
    """Convert; the result's ``fixed_s`` is the time before this rank's first byte, counted from
    ``started`` (the process start, ``time.time()`` clock) or else from this call."""
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
    first_byte = time.time()
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
            "fixed_s": first_byte - (started or t0), "plan_s": first_byte - t0,
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
                  enabled=comm.rank == 0) as bar, Writeback(writer.dir / writer.relpath) as flush:
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
            elif (parts := _row_parts(plan, ck, e)) is not None:  # rows only move, values decoded
                _write_rows(plan, ck, e, parts, writer)
                bar.update(plan.entry_bytes(e))
            else:
                t = R.to_mcore(e.rule, [ck.get(h) for h in e.hf], plan.model.shapes).to(plan.dtypes[e.mcore])
                for piece in plan.pieces[e.mcore]:
                    writer.write_tensor(piece, piece_of(t, piece))
                del t
                bar.update(plan.entry_bytes(e))
            journal.append({"name": name, "offset": writer.tell(), "records": writer.records_since(before)})
            flush.upto(writer.tell())


def _row_parts(plan, ck, e) -> Optional[list[list[tuple[int, int, int]]]]:
    """Per piece of entry ``e``: the ``(HF input, first row, rows)`` runs it is made of, when the
    rule only moves whole rows (``mapping.row_trace``) but the bytes cannot be copied as stored
    (FP8 to dequantise, another dtype); else ``None``."""
    infos = [ck.info(h) for h in e.hf]
    shape = plan.shapes[e.mcore]
    if not shape or any(not i.shape or tuple(i.shape[1:]) != shape[1:] for i in infos):
        return None
    runs = rule_rows(e.rule, plan.model.shapes, "to_mcore", tuple(tuple(i.shape) for i in infos), (shape,))
    if runs is None:
        return None
    parts = []
    for piece in plan.pieces[e.mcore]:
        block = row_block(piece.view_shape, piece.view_stride, piece.view_offset, shape)
        if block is None:
            return None
        parts.append(slice_runs(runs[0], *block))
    return parts


SMALL_BYTES = 8 << 20  # below this, decoding uses one thread (``_write_rows``)


def _write_rows(plan, ck, e, parts, writer) -> None:
    """Each piece straight from the decoded HF tensors' rows: a piece that is a whole HF tensor
    (a gated MLP's gate or up half) is written as decoded, without the MCore tensor's
    concatenation and the chunk copies of the tensor path (measured on Qwen3-MoE FP8 experts:
    those copies were 7 of 19 s).

    Tensors under ``SMALL_BYTES`` are decoded on one thread: a parallel region over a few MB
    gains little on idle cores and stalls when a core is taken (a 3 MB FP8 expert: 0.15 ms on two
    idle cores, 0.3 ms on one, 2.9 ms on two with the other core busy; an 8 GB Qwen3-MoE FP8
    conversion on this shared machine: 14 s vs 32 s). Ranks sharing a node's cores see the same."""
    threads = torch.get_num_threads()
    if plan.entry_bytes(e) < SMALL_BYTES:
        torch.set_num_threads(1)
    try:
        srcs = [ck.get(h) for h in e.hf]
        dtype = plan.dtypes[e.mcore]
        for piece, runs in zip(plan.pieces[e.mcore], parts):
            rows = [torch.zeros(n, *srcs[0].shape[1:], dtype=dtype) if src == ZERO
                    else srcs[src][row:row + n].to(dtype) for src, row, n in runs]
            writer.write_tensor(piece, (rows[0] if len(rows) == 1 else torch.cat(rows)).reshape(piece.sizes))
    finally:
        torch.set_num_threads(threads)


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
