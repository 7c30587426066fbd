"""Live weight sync: the trainer's Megatron-Core run-time shards -> HF tensors -> rollout engine.

    sync = WeightSync(model_chunks, hf_config, engine_dtype=torch.float32)   # every trainer rank
    stats = sync.sync(engine if rank == 0 else None)                        # after each step

What happens, with nothing written per model family:
1. Layout (once, collective; ``rl.sync.layout``). Each rank names its parameters and persistent
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
3. Moves. Per bucket, every piece held elsewhere reaches the destination's receive buffer
   b % 2 (merged tensors at offsets planned once) by one of two transports (``transport``):
   - messages (``p2p``; GPUs, other hosts): point-to-point on the default group (gloo here,
     NCCL on GPU), straight from the trainer's parameter storage; pieces split along dim 0 are
     received directly into their rows of the merged tensor (TP rank r's ``[gate_r; up_r]`` as
     two runs), others into the buffer's staging region and copied into place;
   - shared buffers (``shm``; trainer ranks on the destination's host, CPU, the ``auto``
     default there): the buffers live in shared memory (``rl.sync.shm``) and each holder copies
     its pieces into place itself, on its own core, between two tiny messages per bucket
     ("buffer free" from the destination, "written" back).
   A helper thread at the destination fills bucket b + 1 (its own pieces copied in) while the
   engine loads bucket b. Then ``rules.to_hf``, the cast to the engine dtype (the rule's
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
freed memory themselves, so there the buffers go back after each sync (and ``auto`` uses
messages). Measured with ``tools.bench_sync`` (0.58 GB, TP=2, 2 cores): CPU seconds of the
sync over vLLM's own reload 2.1x with fresh tensors, 1.5-1.6x with kept buffers over gloo
(gloo's TCP thread: ~0.07 CPU s on the destination), 1.2-1.3x with shared buffers.
Leaves out: a transport between processes that share no torch.distributed group (a Ray actor
engine wraps ``load_weights``), optimizer state, MTP layers (not in the plans). Without it the
trainer could not sample from the policy it trains.
"""
from __future__ import annotations

import time
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from mapping import rules as R
from mapping.entries import expand
from mapping.rules import stacked_slice
from mapping.registry import family_for
from rl.sync import shm as sync_shm
from rl.sync.layout import (STAGING, Move, SyncError, choose_sources, global_shape, in_place, layer_major,
                            pack_buckets, placement, plan_buffers, plan_moves, scan_local, staging_bytes, unwrap)

FREE, WRITTEN = 0, 1  # signals to / from ranks that write into the shared buffers


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


# --------------------------------------------------------------------------- transports
def _p2p_only(hosts, dst, device, keep) -> frozenset:
    return frozenset()


def _shared_where_possible(hosts, dst, device, keep) -> frozenset:
    """Ranks on the destination's host write into shared buffers (CPU, kept buffers)."""
    if device.type != "cpu" or not keep:
        return frozenset()
    return frozenset(r for r, h in enumerate(hosts) if r != dst and h == hosts[dst])


def _shared_required(hosts, dst, device, keep) -> frozenset:
    far = [r for r, h in enumerate(hosts) if h != hosts[dst]]
    if device.type != "cpu" or not keep or far:
        raise SyncError(f"transport='shm' needs CPU tensors, kept buffers and every trainer rank on the "
                        f"destination's host (device {device}, keep_buffers={keep}, ranks elsewhere {far}); "
                        "use transport='auto'")
    return _shared_where_possible(hosts, dst, device, keep)


TRANSPORTS = {"auto": _shared_where_possible, "p2p": _p2p_only, "shm": _shared_required}


class WeightSync:
    """Built once on every trainer rank (collective); ``sync`` after every optimizer step."""

    def __init__(self, model, hf_config: dict, *, engine_dtype: Optional[torch.dtype] = None,
                 bucket_bytes: int = 512 * 2**20, dst_rank: int = 0, keep_buffers: Optional[bool] = None,
                 transport: str = "auto"):
        """``bucket_bytes``: the in-flight bound (two buckets of half); ``keep_buffers``: keep the
        receive buffers between syncs (None: on CPU); ``transport``: "auto" (shared buffers for
        ranks on the destination's host on CPU, messages otherwise), "p2p" (messages only) or
        "shm" (shared buffers, refused where impossible). Collective over the trainer ranks."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r}: choose one of {sorted(TRANSPORTS)}")
        chunks = [unwrap(c) for c in (model if isinstance(model, (list, tuple)) else [model])]
        family = family_for(hf_config)
        m = family.read_config(hf_config)
        self.entries, self.shapes, self.dst = expand(family.rules(m), m), m.shapes, dst_rank
        if stacked := sorted({h for e in self.entries for h in e.hf if stacked_slice(h)}):
            raise SyncError(f"{family.name}: {len(stacked)} HF tensors stack all experts (e.g. {stacked[0]}); live "
                            "sync sends whole HF tensors per bucket and cannot assemble those yet: train another "
                            "family or export with mcore2hf and reload")
        self.rank, self.bucket_bytes = dist.get_rank(), bucket_bytes
        shards, self._local, errors = scan_local(chunks, self.entries, m.num_experts, self.rank)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (shards, errors, sync_shm.host_key()))
        if errors := [e for _, errs, _ in gathered for e in errs]:
            raise SyncError(f"{len(errors)} trainer tensors do not fit the {family.name} mapping: "
                            + "; ".join(errors[:6]) + (" ..." if len(errors) > 6 else ""))
        self.sources = choose_sources([s for ss, _, _ in gathered for s in ss], self.entries, dst_rank)
        self.runs = {i: placement(self.entries[i].rule, ps) for i, ps in self.sources.items()}
        self.engine_dtype = engine_dtype or self.sources[0][0].dtype
        self.hf = {i: self._hf_outputs(i) for i in self.sources}
        self.hf_names = [n for i in range(len(self.entries)) for n, _, _ in self.hf[i]]
        self.device = next(iter(self._local.values())).device if self._local else torch.device("cpu")
        self.keep_buffers = self.device.type == "cpu" if keep_buffers is None else keep_buffers
        self._arenas: list[torch.Tensor] = []
        self.transport = transport
        self._plan(TRANSPORTS[transport]([h for _, _, h in gathered], dst_rank, self.device, self.keep_buffers))
        if self.direct and not self._share_buffers(required=transport == "shm"):
            self._plan(frozenset())

    def _plan(self, direct: frozenset) -> None:
        """Buckets, messages and buffer layout, with ``direct`` = the ranks that write their pieces
        into the shared buffers themselves."""
        self.direct, src, runs = direct, self.sources, self.runs
        costs = {i: max(sum(p.nbytes for p in ps) + staging_bytes(ps, runs[i], self.dst, direct),
                        sum(_nbytes(sh, dt) for _, sh, dt in self.hf[i])) for i, ps in src.items()}
        # two buckets are in flight at the destination, each holding at most 2 x its cost
        self.buckets = pack_buckets(layer_major(self.entries), costs, self.bucket_bytes // 2)
        self.bucket_costs = [sum(costs[i] for i in b) for b in self.buckets]
        self.moves, self._signal_tag0 = plan_moves(self.buckets, src, runs, self.dst, direct)
        self.slots, self.arena_bytes = plan_buffers(self.buckets, src, runs, self.dst, direct)
        self.writes = [[(i, k) for i in b for k, p in enumerate(src[i]) if p.rank in direct] for b in self.buckets]

    def _share_buffers(self, required: bool) -> bool:
        """Collective: the destination creates the two buffers in shared memory, the ``direct``
        ranks map them. False (with a warning) when the destination could not create them."""
        msg: list = [None]
        if self.rank == self.dst:
            ok, why = sync_shm.shared_memory_available(2 * self.arena_bytes)
            try:
                if ok:
                    paths, self._arenas = sync_shm.create_shared(self.arena_bytes)
                msg = [paths] if ok else [why]
            except OSError as err:
                msg = [str(err)]
        dist.broadcast_object_list(msg, src=self.dst)
        if isinstance(msg[0], str):
            if required:
                raise SyncError(f"transport='shm': {msg[0]}")
            warnings.warn(f"WeightSync: shared receive buffers unavailable ({msg[0]}); using point-to-point "
                          "messages from every rank", stacklevel=3)
            return False
        if self.rank in self.direct:
            self._arenas = sync_shm.attach_shared(msg[0], self.arena_bytes)
        dist.barrier()
        if self.rank == self.dst:
            sync_shm.unlink_shared(msg[0])
        return True

    def _hf_outputs(self, i: int) -> list[tuple[str, tuple, torch.dtype]]:
        e = self.entries[i]
        meta = torch.empty(global_shape(self.sources[i]), device="meta")
        outs = R.to_hf(e.rule, meta, self.shapes)
        return [(n, tuple(t.shape), e.rule.hf_dtype or self.engine_dtype) for n, t in zip(e.hf, outs)]

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
        for b, per_entry in enumerate(self.moves):
            if self.rank in self.direct:
                sent += self._write(b)
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

    def _write(self, b: int) -> int:
        """Copy this rank's pieces of bucket b into shared buffer b % 2 once the destination says
        it is free (its previous bucket was loaded), then say it is written."""
        flag, arena, n = torch.zeros(1, dtype=torch.int32), self._arenas[b % 2], 0
        dist.recv(flag, self.dst, tag=self._signal_tag0 + 2 * b + FREE)
        for i, k in self.writes[b]:
            if self.sources[i][k].rank == self.rank:
                n += self._place(self._merged_view(i, arena, self.slots[b]), i, k)
        dist.send(flag, self.dst, tag=self._signal_tag0 + 2 * b + WRITTEN)
        return n

    def _merged_view(self, i: int, arena: torch.Tensor, slots: dict) -> torch.Tensor:
        pieces = self.sources[i]
        return _view(arena, slots[i], global_shape(pieces), pieces[0].dtype)

    def _place(self, merged: torch.Tensor, i: int, k: int, src: Optional[torch.Tensor] = None) -> int:
        """Copy piece k of entry i (this rank's, or ``src``) into its runs of ``merged``."""
        p = self.sources[i][k]
        src = self._local[(i, p.index)].detach() if src is None else src
        if len(self.sources[i]) == 1:
            merged.copy_(src)
        for g0, s0, n in (self.runs[i][k] if len(self.sources[i]) > 1 else ()):
            merged.narrow(p.dim, g0, n).copy_(src.narrow(p.dim, s0, n))
        return src.nbytes

    def _receive(self, engine, t0: float) -> SyncStats:
        """Load bucket b while a helper thread receives and converts bucket b + 1."""
        if engine.dtype != self.engine_dtype:
            raise SyncError(f"engine dtype {engine.dtype} != the sync's engine_dtype {self.engine_dtype}; "
                            "build WeightSync with engine_dtype=engine.dtype")
        timings, totals = defaultdict(float), defaultdict(int)
        if not self._arenas:
            self._arenas = [torch.empty(self.arena_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self._known_storage = {t.untyped_storage().data_ptr() for t in [*self._local.values(), *self._arenas]}
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
                    # buffer (b + 1) % 2 held bucket b - 1, loaded in the previous iteration
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

    def _fetch(self, b: int, timings) -> tuple[list, int, int]:
        """(HF tensors of bucket b, bytes it holds (its receive buffer and tensors made by the
        rules or the cast), bytes received)."""
        t, out = time.perf_counter(), []
        merged, received = self._collect(b)
        for i in self.buckets[b]:
            e = self.entries[i]
            hf = R.to_hf(e.rule, merged[i], self.shapes)
            out += [(name, x.to(dtype)) for (name, _, dtype), x in zip(self.hf[i], hf)]
        timings["fetch_s"] += time.perf_counter() - t
        return out, self.arena_bytes + _new_bytes(out, self._known_storage), received

    def _collect(self, b: int) -> tuple[dict[int, torch.Tensor], int]:
        """Bucket b's merged tensors in buffer b % 2 (own pieces copied in, the others received or
        written by their holders), and the bytes that came from other ranks."""
        flag, arena, slots = torch.zeros(1, dtype=torch.int32), self._arenas[b % 2], self.slots[b]
        for r in sorted(self.direct):
            dist.send(flag, r, tag=self._signal_tag0 + 2 * b + FREE)
        merged, got = {}, 0
        for i in self.buckets[b]:
            merged[i], n = self._merged(i, self.moves[b][i], arena, slots)
            got += n
        for r in sorted(self.direct):
            dist.recv(flag, r, tag=self._signal_tag0 + 2 * b + WRITTEN)
        return merged, got + sum(self.sources[i][k].nbytes for i, k in self.writes[b])

    def _merged(self, i: int, moves: list[Move], arena: torch.Tensor, slots: dict) -> tuple[torch.Tensor, int]:
        """Entry i's global tensor in its slot of ``arena``: own pieces copied in, the others
        received (into place when split along dim 0); pieces of ``direct`` ranks are left to them."""
        pieces, runs, pending, got = self.sources[i], self.runs[i], iter(moves), 0
        if len(pieces) == 1 and pieces[0].rank == self.dst:
            return self._local[(i, pieces[0].index)].detach(), 0
        merged = self._merged_view(i, arena, slots)
        for k, (p, p_runs) in enumerate(zip(pieces, runs)):
            if p.rank == self.dst:
                self._place(merged, i, k)
            elif p.rank in self.direct:
                continue
            elif len(pieces) == 1:
                dist.recv(merged, p.rank, tag=next(pending).tag)
                got += merged.nbytes
            elif in_place(p, p_runs):
                for g0, _, n in p_runs:  # straight into the merged tensor's rows
                    dist.recv(merged.narrow(0, g0, n), p.rank, tag=next(pending).tag)
                    got += merged.narrow(0, g0, n).nbytes
            else:
                src = _view(arena, slots[STAGING], p.shape, p.dtype)
                dist.recv(src, p.rank, tag=next(pending).tag)
                got += self._place(merged, i, k, src)
        return merged, got

    def _drain(self, ahead, start: int) -> None:
        """After a failure: receive (and drop) what the senders still send, so they do not block
        and the next sync starts in step."""
        if ahead is not None:
            ahead.exception()  # wait for the helper; its own error, if any, is secondary
        for b in range(start, len(self.buckets)):
            self._collect(b)


def _view(arena: torch.Tensor, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
    return arena.narrow(0, offset, _nbytes(shape, dtype)).view(dtype).view(shape)


def _new_bytes(out, known: set) -> int:
    """Bytes held by ``out`` tensors whose storage is not among ``known`` (trainer, buffers)."""
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
