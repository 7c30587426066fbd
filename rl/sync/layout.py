"""Who holds what, and in which order it travels: the layout half of the live weight sync.

Pure functions on names, shapes and mapping rules (no tensors move here, no process groups are
created): the TP=PP=EP=1 name of a local parameter (``global_name``), this rank's shards of the
plan entries with their partitioning checked against the rules (``scan_local``), one holder per
shard (``choose_sources``), loading order and buckets (``layer_major``, ``pack_buckets``), where
each shard's rows land in the merged tensor (``placement``, found by running the rule's own
``merge_tp`` on index tensors), where each merged tensor lives in its bucket's receive buffer
(``plan_buffers``) and which messages travel (``plan_moves``). ``rl.sync.weight_sync`` moves the
tensors.
"""
from __future__ import annotations

import bisect
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from mapping import rules as R
from mapping.entries import Entry

MAX_RUNS = 8  # a piece scattered into more runs than this travels whole and is copied into place
STAGING = -1  # slot key: where pieces copied into place are received
ALIGN = 64    # byte alignment of each merged tensor in a receive buffer
LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
EXPERT = re.compile(r"(\.local_experts\.)(\d+)(\.)")


class SyncError(RuntimeError):
    """The trainer's tensors do not match the mapping plan; the message names them."""


@dataclass(frozen=True)
class Move:
    """One message: a whole piece, or ``rows`` = (piece_start, length) of it along dim 0."""
    entry: int
    index: int
    src: int
    rows: Optional[tuple[int, int]]
    tag: int


@dataclass(frozen=True)
class Shard:
    """One rank's piece of one plan entry."""
    entry: int
    index: int                # position along the partition dim (0 when replicated)
    count: int                # pieces along the partition dim (1 when replicated)
    dim: Optional[int]        # partition dim, None when replicated
    shape: tuple[int, ...]
    dtype: torch.dtype
    rank: int
    stage: int = 0            # pipeline stage of the holder (replicas of one tensor share a stage)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


# --------------------------------------------------------------------------- names
def global_name(local: str, layer_offset: int = 0, expert_offset: int = 0) -> str:
    """TP=PP=EP=1 name of a local parameter name: ``decoder.layers.i`` -> ``i + layer_offset``,
    ``local_experts.e`` -> ``e + expert_offset`` (= EP rank x experts per rank)."""
    m = LAYER.match(local)
    if m:
        local = f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}"
    if expert_offset:
        local = EXPERT.sub(lambda x: f"{x.group(1)}{int(x.group(2)) + expert_offset}{x.group(3)}", local)
    return local


def layer_offset(chunk) -> int:
    """Global index of this model chunk's first decoder layer (its PP stage / virtual stage)."""
    numbers = [layer.layer_number - 1 for layer in chunk.decoder.layers]
    if numbers and numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise SyncError(f"decoder layers of this chunk are not consecutive: {numbers}")
    return numbers[0] if numbers else 0


def unwrap(module):
    """The GPTModel inside DDP / Float16Module style wrappers (their ``.module``)."""
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module


def local_tensors(chunk):
    """(name, tensor) of parameters and persistent buffers, as in ``state_dict()``."""
    for name, t in chunk.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor) and not name.endswith("_extra_state"):
            yield name, t


# --------------------------------------------------------------------------- layout
def _partition(t: torch.Tensor, entry: Entry, name: str) -> Optional[int]:
    """The dim `t` is split along over TP (None: whole on every TP rank). A tensor the rule partitions
    may be whole: Transformer Engine keeps MLA's down projections duplicated on every TP rank, where the
    local spec splits them by column; a whole tensor is always complete. A split the rule does not
    expect is an error naming the rule."""
    dim = getattr(t, "partition_dim", None) if getattr(t, "tensor_model_parallel", False) else None
    if dim is not None and dim != entry.rule.partition_dim:
        what = f"partitioned along dim {dim}" if dim is not None else "not partitioned"
        raise SyncError(f"{name}: the mapping rule says tp={entry.rule.tp!r} (partition dim "
                        f"{entry.rule.partition_dim}) but the Megatron-Core tensor is {what}; "
                        f"fix the rule for {entry.rule.mcore} in mapping/families/")
    return dim


def _group_position(dim, expert: bool) -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if dim is None:
        return 0, 1
    if expert:
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def scan_local(chunks, entries: list[Entry], num_experts: int, rank: int):
    """This rank's shards: ([Shard], {(entry, index): tensor}, [errors])."""
    from megatron.core import parallel_state as ps

    index = {e.mcore: i for i, e in enumerate(entries)}
    stage = ps.get_pipeline_model_parallel_rank()
    ep = ps.get_expert_model_parallel_world_size() if num_experts else 1
    e_off = ps.get_expert_model_parallel_rank() * (num_experts // ep) if num_experts else 0
    shards, tensors, errors = [], {}, []
    for chunk in chunks:
        offset = layer_offset(chunk)
        for name, t in local_tensors(chunk):
            g = global_name(name, offset, e_off)
            i = index.get(g)
            if i is None:
                if not getattr(t, "shared_embedding", False):  # PP's last-stage copy of tied embeddings
                    errors.append(f"rank {rank}: {g} (local {name}) is in no mapping rule")
                continue
            try:
                dim = _partition(t, entries[i], g)
            except SyncError as err:
                errors.append(f"rank {rank}: {err}")
                continue
            pos, count = _group_position(dim, entries[i].rule.expert)
            shards.append(Shard(i, pos, count, dim, tuple(t.shape), t.dtype, rank, stage))
            tensors[(i, pos)] = t
    return shards, tensors, errors


def choose_sources(all_shards: list[Shard], entries: list[Entry], dst: int = 0) -> dict[int, list[Shard]]:
    """Per entry, one holder per shard index (the destination if it holds it, else the lowest
    rank), checked for completeness: every entry held, as a full set of shards, by ranks of ONE
    pipeline stage. Two stages holding the same layer means stage-local layer numbers were taken
    for global ones (both stages' first layer named layers.0), which also leaves layers unheld."""
    held: dict[int, dict[int, Shard]] = defaultdict(dict)
    stages: dict[int, set[int]] = defaultdict(set)
    problems: dict[str, list[str]] = defaultdict(list)
    for s in sorted(all_shards, key=lambda s: (s.rank != dst, s.rank)):
        held[s.entry].setdefault(s.index, s)
        stages[s.entry].add(s.stage)
    chosen = {}
    for i, e in enumerate(entries):
        pieces = held.get(i)
        if not pieces:
            problems["no rank holds it (dropped)"].append(e.mcore)
            continue
        if len(stages[i]) > 1:
            problems["held by pipeline stages " + str(sorted(stages[i])) + " (stage-local layer numbers collide)"].append(
                e.mcore)
            continue
        counts = {(s.count, s.dim) for s in pieces.values()}
        if len(counts) != 1 or set(pieces) != set(range(next(iter(counts))[0])):
            problems[f"shards {sorted(pieces)} of {sorted(counts)} are not a full set"].append(e.mcore)
            continue
        chosen[i] = [pieces[k] for k in sorted(pieces)]
    if problems:
        n = sum(len(v) for v in problems.values())
        raise SyncError(f"{n} plan entries cannot be assembled from the trainer's ranks: " + "; ".join(
            f"{len(names)} {why}: {', '.join(names[:2])}{' ... ' + names[-1] if len(names) > 2 else ''}"
            for why, names in problems.items()))
    return chosen


def global_shape(pieces: list[Shard]) -> tuple[int, ...]:
    shape = list(pieces[0].shape)
    if pieces[0].dim is not None:
        shape[pieces[0].dim] = sum(p.shape[pieces[0].dim] for p in pieces)
    return tuple(shape)


def layer_major(entries: list[Entry]) -> list[int]:
    """Entry order for loading: non-layer tensors, then layer by layer (rule order within)."""
    return sorted(range(len(entries)), key=lambda i: (-1 if entries[i].layer is None else entries[i].layer, i))


def pack_buckets(order: list[int], costs: dict[int, int], bound: int) -> list[list[int]]:
    """Consecutive entries in buckets of at most ``bound`` bytes (an oversize entry alone)."""
    buckets, cur, size = [], [], 0
    for i in order:
        if cur and size + costs[i] > bound:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += costs[i]
    if cur:
        buckets.append(cur)
    return buckets


def placement(rule, pieces: list[Shard]) -> list[list[tuple[int, int, int]]]:
    """Per piece, the runs ``(global_start, piece_start, length)`` along the partition dim that
    ``rules.merge_tp`` moves it to (e.g. TP rank r's ``[gate_r; up_r]`` lands in two runs)."""
    if len(pieces) == 1:
        return [[(0, 0, pieces[0].shape[pieces[0].dim] if pieces[0].dim is not None else 0)]]
    d, ndim = pieces[0].dim, len(pieces[0].shape)
    starts, probes, pos = [], [], 0
    for p in pieces:
        n = p.shape[d]
        shape = [1] * ndim
        shape[d] = n
        probes.append(torch.arange(pos, pos + n).reshape(shape))
        starts.append(pos)
        pos += n
    ids = R.merge_tp(rule, probes).flatten().tolist()
    runs = [[] for _ in pieces]
    for g, i in enumerate(ids):
        r = bisect.bisect_right(starts, i) - 1
        run = runs[r][-1] if runs[r] else None
        if run and run[0] + run[2] == g and run[1] + run[2] == i - starts[r]:
            runs[r][-1] = (run[0], run[1], run[2] + 1)
        else:
            runs[r].append((g, i - starts[r], 1))
    return runs


# --------------------------------------------------------------------------- transfer plan
def in_place(p: Shard, runs) -> bool:
    """A piece split along dim 0 in few runs is received straight into its rows of the merged tensor."""
    return p.count > 1 and p.dim == 0 and len(runs) <= MAX_RUNS


def staging_bytes(pieces: list[Shard], runs, dst: int, direct=frozenset()) -> int:
    """Bytes of the largest piece received whole (not from ``dst`` or a ``direct`` writer) and
    then copied into place."""
    if len(pieces) == 1:
        return 0
    return max([p.nbytes for p, r in zip(pieces, runs) if p.rank != dst and p.rank not in direct
                and not in_place(p, r)], default=0)


def plan_buffers(buckets, sources, runs, dst: int, direct=frozenset()) -> tuple[list[dict[int, int]], int]:
    """Per bucket, the byte offset of each merged tensor in the bucket's receive buffer (an entry
    the destination holds whole needs none) and, under key ``STAGING``, of the staging region for
    pieces copied into place; and the buffer size (the largest bucket's layout)."""
    slots, size = [], 0
    for bucket in buckets:
        off, at = 0, {}
        for i in bucket:
            pieces = sources[i]
            if len(pieces) > 1 or pieces[0].rank != dst:
                at[i] = off
                off += -(-global_nbytes(pieces) // ALIGN) * ALIGN
        at[STAGING] = off
        slots.append(at)
        size = max(size, off + max([staging_bytes(sources[i], runs[i], dst, direct) for i in bucket], default=0))
    return slots, size


def plan_moves(buckets, sources, runs, dst: int, direct=frozenset()) -> tuple[list[dict[int, list[Move]]], int]:
    """Per bucket, per entry, the messages the destination receives, in order (pieces held by
    ``direct`` ranks are written into the buffer by their holder instead), and the next free tag."""
    tag, plan = 0, []
    for bucket in buckets:
        per_entry = {}
        for i in bucket:
            moves = []
            for p, r in zip(sources[i], runs[i]):
                if p.rank == dst or p.rank in direct:
                    continue
                for run in (r if in_place(p, r) else [None]):
                    moves.append(Move(i, p.index, p.rank, None if run is None else (run[1], run[2]), tag))
                    tag += 1
            per_entry[i] = moves
        plan.append(per_entry)
    return plan, tag


def global_nbytes(pieces: list[Shard]) -> int:
    n = pieces[0].dtype.itemsize
    for s in global_shape(pieces):
        n *= s
    return n
