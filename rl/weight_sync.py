"""Live weight sync: the trainer's Megatron-Core run-time shards -> HF tensors -> rollout engine.

    sync = WeightSync(model_chunks, hf_config, engine_dtype=torch.float32)   # every trainer rank
    stats = sync.sync(engine if rank == 0 else None)                        # after each step

What happens, with nothing written per model family:
1. Layout (once, collective). Each rank names its parameters and persistent buffers (the router
   expert bias travels too) by their TP=PP=EP=1 names (``global_name``: PP stages offset layer
   numbers, EP ranks offset expert numbers), finds the plan entry (``mapping`` rules) of each,
   and records the shard it holds. The partitioning comes from the parameter itself
   (``tensor_model_parallel``/``partition_dim``, TP group; expert-TP group for expert rules) and
   must agree with the rule's ``tp``, or the rule is wrong and the sync refuses to start. All
   ranks exchange their records: every entry must be complete (all shards held somewhere), and
   every local tensor must belong to an entry. One holder (the lowest rank) is chosen per shard.
2. Buckets. Entries are ordered layer by layer (vLLM processes a layer once all its tensors
   arrived) and packed into buckets of at most ``bucket_bytes`` (the larger of the bytes moved
   and the HF bytes produced; one tensor larger than the bound travels alone).
3. Per bucket, each holder other than the destination packs its shards into one flat buffer and
   sends it (point-to-point on the default group: gloo here, NCCL on GPU); the destination has
   already posted the receive for the next bucket while it converts this one: shards ->
   ``rules.merge_tp`` (undoes run-time layouts such as TP rank r's ``[gate_r; up_r]``) ->
   ``rules.to_hf`` -> cast to the engine dtype (the rule's ``hf_dtype`` wins: the fp32 router
   bias) -> ``engine.load_weights(bucket)``.
4. ``engine.finish_weight_update()`` proves, engine-side, that every parameter was refreshed
   once (``rl.rollout.vllm_reload``); the destination announced the full HF name list first.

Memory at the destination: the bucket being loaded (its HF tensors and its received buffers)
plus the receive buffers of the next bucket: about two buckets. Other ranks hold one packed
bucket at a time. Leaves out: the transport between processes that share no torch.distributed
group (a Ray actor engine wraps ``load_weights``), optimizer state, MTP layers (not in the plans).
Without it the trainer could not sample from the policy it is training.
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mapping import rules as R
from mapping.plan import Entry, expand
from mapping.registry import family_for

LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
EXPERT = re.compile(r"(\.local_experts\.)(\d+)(\.)")
ALIGN = 64  # byte alignment of each shard inside a packed buffer (any dtype view is legal)


class SyncError(RuntimeError):
    """The trainer's tensors do not match the mapping plan; the message names them."""


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

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


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
    dim = getattr(t, "partition_dim", None) if getattr(t, "tensor_model_parallel", False) else None
    if dim != entry.rule.partition_dim:
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
            shards.append(Shard(i, pos, count, dim, tuple(t.shape), t.dtype, rank))
            tensors[(i, pos)] = t
    return shards, tensors, errors


def choose_sources(all_shards: list[Shard], entries: list[Entry], dst: int = 0) -> dict[int, list[Shard]]:
    """Per entry, one holder per shard index (the destination if it holds it, else the lowest
    rank), checked for completeness."""
    held: dict[int, dict[int, Shard]] = defaultdict(dict)
    problems = []
    for s in sorted(all_shards, key=lambda s: (s.rank != dst, s.rank)):
        held[s.entry].setdefault(s.index, s)
    chosen = {}
    for i, e in enumerate(entries):
        pieces = held.get(i)
        if not pieces:
            problems.append(f"{e.mcore}: no rank holds it")
            continue
        counts = {(s.count, s.dim) for s in pieces.values()}
        if len(counts) != 1 or set(pieces) != set(range(next(iter(counts))[0])):
            problems.append(f"{e.mcore}: shards {sorted(pieces)} of {sorted(counts)} are not a full set")
            continue
        chosen[i] = [pieces[k] for k in sorted(pieces)]
    if problems:
        raise SyncError(f"{len(problems)} plan entries cannot be assembled from the trainer's ranks: "
                        + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))
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


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def buffer_layout(pieces: list[Shard]) -> tuple[list[int], int]:
    """Byte offsets of each piece in a packed buffer, and the buffer size."""
    offsets, pos = [], 0
    for p in pieces:
        offsets.append(pos)
        pos += _aligned(p.nbytes)
    return offsets, pos


def pack(tensors: list[torch.Tensor], offsets: list[int], size: int, device) -> torch.Tensor:
    buf = torch.empty(size, dtype=torch.uint8, device=device)
    for t, off in zip(tensors, offsets):
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        buf[off: off + flat.numel()].copy_(flat)
    return buf


def unpack(buf: torch.Tensor, pieces: list[Shard], offsets: list[int]) -> list[torch.Tensor]:
    return [buf[off: off + p.nbytes].view(p.dtype).view(p.shape) for p, off in zip(pieces, offsets)]


# --------------------------------------------------------------------------- the sync
class WeightSync:
    """Built once on every trainer rank (collective); ``sync`` after every optimizer step."""

    def __init__(self, model, hf_config: dict, *, engine_dtype: Optional[torch.dtype] = None,
                 bucket_bytes: int = 512 * 2**20, dst_rank: int = 0):
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
        self.engine_dtype = engine_dtype or self.sources[0][0].dtype
        self.hf = {i: self._hf_outputs(i) for i in self.sources}
        self.hf_names = [n for i in range(len(self.entries)) for n, _, _ in self.hf[i]]
        costs = {i: max(sum(p.nbytes for p in ps), sum(_nbytes(sh, dt) for _, sh, dt in self.hf[i]))
                 for i, ps in self.sources.items()}
        self.buckets = pack_buckets(layer_major(self.entries), costs, bucket_bytes)
        self.bucket_costs = [sum(costs[i] for i in b) for b in self.buckets]
        self.routes = [self._routes(b) for b in self.buckets]

    def _hf_outputs(self, i: int) -> list[tuple[str, tuple, torch.dtype]]:
        e = self.entries[i]
        meta = torch.empty(global_shape(self.sources[i]), device="meta")
        outs = R.to_hf(e.rule, meta, self.shapes)
        return [(n, tuple(t.shape), e.rule.hf_dtype or self.engine_dtype) for n, t in zip(e.hf, outs)]

    def _routes(self, bucket: list[int]) -> dict[int, tuple[list[Shard], list[int], int]]:
        """Source rank -> (pieces it sends, their offsets, buffer size), for ranks != dst."""
        per_rank = defaultdict(list)
        for i in bucket:
            for p in self.sources[i]:
                if p.rank != self.dst:
                    per_rank[p.rank].append(p)
        return {r: (ps, *buffer_layout(ps)) for r, ps in per_rank.items()}

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
        for b, routes in enumerate(self.routes):
            if self.rank in routes:
                pieces, offsets, size = routes[self.rank]
                tensors = [self._local[(p.entry, p.index)] for p in pieces]
                dist.send(pack(tensors, offsets, size, tensors[0].device), self.dst, tag=b)
                sent += size
        return sent

    def _post(self, b: int) -> dict[int, tuple[torch.Tensor, object]]:
        if b >= len(self.buckets):
            return {}
        device = next(iter(self._local.values())).device if self._local else torch.device("cpu")
        posted = {}
        for r, (_, _, size) in self.routes[b].items():
            buf = torch.empty(size, dtype=torch.uint8, device=device)
            posted[r] = (buf, dist.irecv(buf, r, tag=b))
        return posted

    def _receive(self, engine, t0: float) -> SyncStats:
        if engine.dtype != self.engine_dtype:
            raise SyncError(f"engine dtype {engine.dtype} != the sync's engine_dtype {self.engine_dtype}; "
                            "build WeightSync with engine_dtype=engine.dtype")
        timings = defaultdict(float)
        stats = dict(hf_bytes=0, received_bytes=0, peak=0)
        pending, b = self._post(0), -1  # the senders start at once: receive even if begin fails
        try:
            engine.begin_weight_update(self.hf_names)
            for b in range(len(self.buckets)):
                current, pending = pending, None
                t = time.perf_counter()
                for _, work in current.values():
                    work.wait()
                timings["wait_s"] += time.perf_counter() - t
                t = time.perf_counter()
                bufs = {r: buf for r, (buf, _) in current.items()}
                out = self._assemble(b, bufs)
                timings["convert_s"] += time.perf_counter() - t
                held = sum(x.numel() for x in bufs.values()) + _new_bytes(out, bufs.values(), self._local.values())
                ahead = self._recv_bytes(b + 1)
                if held + ahead <= 2 * self.bucket_bytes:  # overlap the next transfer with this load
                    pending = self._post(b + 1)
                stats["peak"] = max(stats["peak"], held + (ahead if pending is not None else 0))
                stats["hf_bytes"] += sum(x.numel() * x.element_size() for _, x in out)
                stats["received_bytes"] += sum(x.numel() for x in bufs.values())
                t = time.perf_counter()
                engine.load_weights(out)
                timings["load_s"] += time.perf_counter() - t
                del out, current, bufs
                if pending is None:
                    pending = self._post(b + 1)
            t = time.perf_counter()
            report = engine.finish_weight_update()
            timings["finish_s"] += time.perf_counter() - t
        except BaseException:
            self._drain(pending or {}, b + 2)
            engine.abort_weight_update()  # no-op if the engine already aborted (its own error)
            raise
        return SyncStats(time.perf_counter() - t0, len(self.buckets), stats["hf_bytes"],
                         stats["received_bytes"], max(self.bucket_costs), stats["peak"], report, dict(timings))

    def _recv_bytes(self, b: int) -> int:
        return sum(size for _, _, size in self.routes[b].values()) if b < len(self.buckets) else 0

    def _drain(self, pending, start: int) -> None:
        """Receive (and drop) what the senders still send, so the next sync starts in step."""
        for _, work in pending.values():
            work.wait()
        for b in range(start, len(self.buckets)):
            for _, work in self._post(b).values():
                work.wait()

    def _assemble(self, b: int, bufs: dict[int, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        got = {}
        for r, buf in bufs.items():
            pieces, offsets, _ = self.routes[b][r]
            got.update({(p.entry, p.index): t for p, t in zip(pieces, unpack(buf, pieces, offsets))})
        out = []
        for i in self.buckets[b]:
            e = self.entries[i]
            shards = [got[(p.entry, p.index)] if p.rank != self.dst else self._local[(p.entry, p.index)].detach()
                      for p in self.sources[i]]
            merged = shards[0] if len(shards) == 1 else R.merge_tp(e.rule, shards)
            for (name, _, dtype), t in zip(self.hf[i], R.to_hf(e.rule, merged, self.shapes)):
                out.append((name, t.to(dtype)))
        return out


def _new_bytes(out, *owners) -> int:
    """Bytes of ``out`` tensors not viewing a receive buffer or a trainer tensor (new memory)."""
    known = {t.untyped_storage().data_ptr() for group in owners for t in group}
    seen, total = set(), 0
    for _, t in out:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize
