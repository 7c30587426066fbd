"""Live weight sync: the trainer's Megatron-Core run-time shards -> HF tensors -> rollout engine.

    sync = WeightSync(model_chunks, hf_config, engine_dtype=torch.float32)   # every trainer rank
    stats = sync.sync(engine if rank == 0 else None)                        # after each step

What happens, with nothing written per model family:
1. Layout (once, collective; ``rl.sync_layout``). Each rank names its parameters and persistent
   buffers (the router expert bias travels too) by their TP=PP=EP=1 names (PP stages offset
   layer numbers, EP ranks offset expert numbers), finds the plan entry (``mapping`` rules) of
   each and records the shard it holds. The partitioning comes from the parameter itself
   (``tensor_model_parallel``/``partition_dim``; TP group, expert-TP group for expert rules)
   and must agree with the rule's ``tp``, or the sync refuses to start. All ranks exchange their
   records: every entry must be complete and every local tensor must belong to an entry. One
   holder is chosen per shard (the destination when it has one). Where each shard's rows land
   in the merged tensor is found by running the rule's own ``merge_tp`` on index tensors.
2. Buckets. Entries are ordered layer by layer (vLLM processes a layer once all its tensors
   arrived) and packed into buckets costing at most ``bucket_bytes / 2`` each (cost = the larger
   of the bytes received into (merged tensor plus the staging space for a piece copied into
   place) and the HF bytes produced; a larger tensor travels alone).
3. Moves. Per bucket, every piece held elsewhere travels as point-to-point messages on the
   default group (gloo here, NCCL on GPU), straight from the trainer's parameter storage. At the
   destination a helper thread receives bucket b + 1 while the engine loads bucket b, into
   receive buffer b % 2 (merged tensors at offsets planned once): pieces split along dim 0 are
   received directly into their rows of the merged tensor (TP rank r's ``[gate_r; up_r]`` as
   two runs), others into the buffer's staging region and copied into place; the destination's
   own pieces are copied in. Then ``rules.to_hf``, the cast to the engine dtype (the rule's
   ``hf_dtype`` wins: the fp32 router bias), ``engine.load_weights(bucket)``, which must return
   holding no reference to the bucket's tensors (the vLLM engine copies what it keeps for a
   layer whose other weights come later): buffer b % 2 is refilled with bucket b + 2.
4. ``engine.finish_weight_update()`` proves, engine-side, that every parameter was refreshed
   once (``rl.rollout.vllm_reload``); the destination announces the full HF name list first.

Memory at the destination: two receive buffers (one loading, one arriving), each the size of
the largest bucket's merged tensors plus staging (<= its cost), and per bucket the HF tensors
the rules or the cast make anew (views of the buffer cost nothing): within 2 x ``bucket_bytes``
unless a single tensor is larger than half of it (``SyncStats.peak_held_bytes`` accounts it).
``keep_buffers`` (default: on CPU) keeps the two buffers for the next sync: fresh CPU memory
costs a page fault per 4 KiB page, measured ~57 ms per 256 MB on the 2-core test machine, which
made the sync's receive side ~1.5x slower than vLLM's own reload there; GPU allocators cache
freed memory themselves, so there the buffers go back after each sync (``release_buffers``
frees kept ones). Senders send from their parameters without copies. Leaves out: a transport
between processes that share no torch.distributed group (a Ray actor engine wraps
``load_weights``), optimizer state, MTP layers (not in the plans). Without it the trainer could
not sample from the policy it trains.
"""
from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from mapping import rules as R
from mapping.plan import expand
from mapping.registry import family_for
from rl.sync_layout import (Shard, SyncError, choose_sources, global_shape, layer_major, pack_buckets,
                            placement, scan_local, unwrap)

MAX_RUNS = 8  # a piece scattered into more runs than this travels whole and is copied into place
STAGING = -1  # slot key: where pieces copied into place are received


@dataclass(frozen=True)
class Move:
    """One message: a whole piece, or ``rows`` = (piece_start, length) of it along dim 0."""
    entry: int
    index: int
    src: int
    rows: Optional[tuple[int, int]]
    tag: int


@dataclass
class SyncStats:
    seconds: float
    buckets: int
    hf_bytes: int
    received_bytes: int
    max_bucket_bytes: int
    peak_held_bytes: int
    engine: object = None
    timings: dict = field(default_factory=dict)
    kept_bytes: int = 0
    """Receive buffers kept for the next sync (``keep_buffers``)."""


class WeightSync:
    """Built once on every trainer rank (collective); ``sync`` after every optimizer step."""

    def __init__(self, model, hf_config: dict, *, engine_dtype: Optional[torch.dtype] = None,
                 bucket_bytes: int = 512 * 2**20, dst_rank: int = 0, keep_buffers: Optional[bool] = None):
        chunks = [unwrap(c) for c in (model if isinstance(model, (list, tuple)) else [model])]
        family = family_for(hf_config)
        m = family.read_config(hf_config)
        self.entries, self.shapes, self.dst = expand(family.rules(m), m), m.shapes, dst_rank
        self.rank, self.bucket_bytes = dist.get_rank(), bucket_bytes
        shards, self._local, errors = scan_local(chunks, self.entries, m.num_experts, self.rank)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (shards, errors))
        if errors := [e for _, errs in gathered for e in errs]:
            raise SyncError(f"{len(errors)} trainer tensors do not fit the {family.name} mapping: "
                            + "; ".join(errors[:6]) + (" ..." if len(errors) > 6 else ""))
        self.sources = choose_sources([s for ss, _ in gathered for s in ss], self.entries, dst_rank)
        self.runs = {i: placement(self.entries[i].rule, ps) for i, ps in self.sources.items()}
        self.engine_dtype = engine_dtype or self.sources[0][0].dtype
        self.hf = {i: self._hf_outputs(i) for i in self.sources}
        self.hf_names = [n for i in range(len(self.entries)) for n, _, _ in self.hf[i]]
        costs = {i: max(sum(p.nbytes for p in ps) + self._staging(i),
                        sum(_nbytes(sh, dt) for _, sh, dt in self.hf[i])) for i, ps in self.sources.items()}
        # two buckets are in flight at the destination, each holding at most 2 x its cost
        self.buckets = pack_buckets(layer_major(self.entries), costs, bucket_bytes // 2)
        self.bucket_costs = [sum(costs[i] for i in b) for b in self.buckets]
        self.moves = self._plan_moves()
        self.device = next(iter(self._local.values())).device if self._local else torch.device("cpu")
        self.slots, self.arena_bytes = self._plan_arenas()
        self.keep_buffers = self.device.type == "cpu" if keep_buffers is None else keep_buffers
        self._arenas: list[torch.Tensor] = []

    def _in_place(self, p: Shard, runs) -> bool:
        """A remote piece split along dim 0 in few runs is received straight into its rows."""
        return p.count > 1 and p.dim == 0 and len(runs) <= MAX_RUNS

    def _staging(self, i: int) -> int:
        """Bytes of entry i's largest remote piece that is received whole and copied into place."""
        return max([p.nbytes for p, runs in zip(self.sources[i], self.runs[i])
                    if p.rank != self.dst and len(self.sources[i]) > 1 and not self._in_place(p, runs)], default=0)

    def _plan_arenas(self) -> tuple[list[dict[int, int]], int]:
        """Per bucket, the byte offset of each merged tensor in the bucket's receive buffer (an
        entry held whole by the destination needs none); after them one staging region for the
        pieces copied into place. Both buffers get the size of the largest bucket's layout."""
        slots, size = [], 0
        for bucket in self.buckets:
            off, at = 0, {}
            for i in bucket:
                pieces = self.sources[i]
                if len(pieces) > 1 or pieces[0].rank != self.dst:
                    at[i] = off
                    off += _aligned(_nbytes(global_shape(pieces), pieces[0].dtype))
            at[STAGING] = off
            slots.append(at)
            size = max(size, off + max([self._staging(i) for i in bucket], default=0))
        return slots, size

    def _hf_outputs(self, i: int) -> list[tuple[str, tuple, torch.dtype]]:
        e = self.entries[i]
        meta = torch.empty(global_shape(self.sources[i]), device="meta")
        outs = R.to_hf(e.rule, meta, self.shapes)
        return [(n, tuple(t.shape), e.rule.hf_dtype or self.engine_dtype) for n, t in zip(e.hf, outs)]

    def _plan_moves(self) -> list[dict[int, list[Move]]]:
        """Per bucket, per entry, the messages the destination receives, in order."""
        tag, plan = 0, []
        for bucket in self.buckets:
            per_entry = {}
            for i in bucket:
                moves = []
                for p, runs in zip(self.sources[i], self.runs[i]):
                    if p.rank == self.dst:
                        continue
                    spans = runs if self._in_place(p, runs) else [None]
                    for run in spans:
                        moves.append(Move(i, p.index, p.rank, None if run is None else (run[1], run[2]), tag))
                        tag += 1
                per_entry[i] = moves
            plan.append(per_entry)
        return plan

    # ----------------------------------------------------------------- per step
    def sync(self, engine=None) -> SyncStats:
        """Collective over the trainer ranks; ``engine`` is required on the destination rank."""
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.rank != self.dst:
                sent = self._send()
                return SyncStats(time.perf_counter() - t0, len(self.buckets), 0, sent, 0, 0)
            if engine is None:
                raise ValueError(f"WeightSync.sync on the destination rank {self.dst} needs the engine")
            return self._receive(engine, t0)

    def _send(self) -> int:
        sent = 0
        for per_entry in self.moves:
            for moves in per_entry.values():
                for mv in moves:
                    if mv.src == self.rank:
                        t = self._piece(mv)
                        dist.send(t, self.dst, tag=mv.tag)
                        sent += t.numel() * t.element_size()
        return sent

    def _piece(self, mv: Move) -> torch.Tensor:
        t = self._local[(mv.entry, mv.index)].detach()
        if mv.rows is not None:
            t = t.narrow(0, mv.rows[0], mv.rows[1])
        return t if t.is_contiguous() else t.contiguous()

    def _receive(self, engine, t0: float) -> SyncStats:
        """Load bucket b while a helper thread receives and converts bucket b + 1."""
        if engine.dtype != self.engine_dtype:
            raise SyncError(f"engine dtype {engine.dtype} != the sync's engine_dtype {self.engine_dtype}; "
                            "build WeightSync with engine_dtype=engine.dtype")
        timings, totals = defaultdict(float), defaultdict(int)
        arenas = self._buffers()
        self._known_storage = {t.untyped_storage().data_ptr() for t in [*self._local.values(), *arenas]}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync") as helper:
            ahead = helper.submit(self._fetch, 0, timings)  # the senders start at once: always receive
            b, loading = -1, 0
            try:
                engine.begin_weight_update(self.hf_names)
                for b in range(len(self.buckets)):
                    out, held, received = ahead.result()
                    totals["peak"] = max(totals["peak"], loading + held)  # b arrived while b - 1 loaded
                    totals["received"] += received
                    loading = held
                    ahead = helper.submit(self._fetch, b + 1, timings) if b + 1 < len(self.buckets) else None
                    totals["hf"] += sum(x.numel() * x.element_size() for _, x in out)
                    t = time.perf_counter()
                    engine.load_weights(out)
                    timings["load_s"] += time.perf_counter() - t
                    del out
                t = time.perf_counter()
                report = engine.finish_weight_update()
                timings["finish_s"] += time.perf_counter() - t
            except BaseException:
                self._drain(ahead, b + 2)
                engine.abort_weight_update()  # no-op if the engine already aborted (its own error)
                raise
            finally:
                if not self.keep_buffers:
                    self._arenas = []
        return SyncStats(time.perf_counter() - t0, len(self.buckets), totals["hf"], totals["received"],
                         max(self.bucket_costs), totals["peak"], report, dict(timings),
                         self.arena_bytes * len(self._arenas))

    def _buffers(self) -> list[torch.Tensor]:
        """The two receive buffers (bucket b uses buffer b % 2), kept between syncs if asked."""
        if not self._arenas:
            self._arenas = [torch.empty(self.arena_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        return self._arenas

    def release_buffers(self) -> None:
        """Free the receive buffers kept between syncs (the next sync allocates them again)."""
        self._arenas = []

    def _fetch(self, b: int, timings) -> tuple[list, int, int]:
        """(HF tensors of bucket b, bytes it holds (its receive buffer and tensors made by the
        rules or the cast), bytes received)."""
        t, out, received = time.perf_counter(), [], 0
        arena, slots = self._arenas[b % 2], self.slots[b]
        for i in self.buckets[b]:
            merged, got = self._merged(i, self.moves[b][i], arena, slots)
            received += got
            e = self.entries[i]
            out += [(name, x.to(dtype)) for (name, _, dtype), x in zip(self.hf[i], R.to_hf(e.rule, merged, self.shapes))]
        timings["fetch_s"] += time.perf_counter() - t
        return out, self.arena_bytes + _new_bytes(out, self._known_storage), received

    def _merged(self, i: int, moves: list[Move], arena: torch.Tensor, slots: dict) -> tuple[torch.Tensor, int]:
        """Entry i's global tensor in its slot of ``arena``: own pieces copied in, the others
        received (into place when split along dim 0)."""
        pieces, runs, pending, got = self.sources[i], self.runs[i], iter(moves), 0
        if len(pieces) == 1 and pieces[0].rank == self.dst:
            return self._local[(i, pieces[0].index)].detach(), 0
        merged = _view(arena, slots[i], global_shape(pieces), pieces[0].dtype)
        if len(pieces) == 1:
            dist.recv(merged, pieces[0].rank, tag=next(pending).tag)
            return merged, merged.nbytes
        d = pieces[0].dim
        for p, p_runs in zip(pieces, runs):
            if p.rank == self.dst:
                src = self._local[(i, p.index)].detach()
            elif self._in_place(p, p_runs):
                for g0, _, n in p_runs:  # straight into the merged tensor's rows
                    dist.recv(merged.narrow(0, g0, n), p.rank, tag=next(pending).tag)
                    got += merged.narrow(0, g0, n).nbytes
                continue
            else:
                src = _view(arena, slots[STAGING], p.shape, p.dtype)
                dist.recv(src, p.rank, tag=next(pending).tag)
                got += src.nbytes
            for g0, s0, n in p_runs:
                merged.narrow(d, g0, n).copy_(src.narrow(d, s0, n))
        return merged, got

    def _drain(self, ahead, start: int) -> None:
        """After a failure: receive (and drop) what the senders still send, so they do not block
        and the next sync starts in step."""
        if ahead is not None:
            ahead.exception()  # wait for the helper; its own error, if any, is secondary
        for b, per_entry in enumerate(self.moves[start:], start):
            for i, moves in per_entry.items():
                self._merged(i, moves, self._arenas[b % 2], self.slots[b])


def _aligned(n: int, to: int = 64) -> int:
    return -(-n // to) * to


def _view(arena: torch.Tensor, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
    n = _nbytes(shape, dtype)
    return arena.narrow(0, offset, n).view(dtype).view(shape)


def _new_bytes(out, known: set) -> int:
    """Bytes held by ``out`` tensors whose storage is not among ``known`` (the trainer's)."""
    seen, total = set(), 0
    for _, t in out:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize
