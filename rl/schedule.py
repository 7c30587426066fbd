"""The policy's passes through Megatron-Core's pipeline schedules (`get_forward_backward_func`: no
pipelining, 1F1B, or interleaved 1F1B with virtual stages): log-prob passes (forward only) and the
training pass (forward and backward of the GRPO loss), over micro-batches of this data-parallel rank.

    mbs = micro_batches(batch, size, dp, dp_rank, equal_packs)     # aligned across data parallel
    out = logprob_pass(policy, chunks, mbs, with_entropy)           # rank 0: logp_BT, ...; others: None
    metrics = train_pass(policy, stack, mbs, loss_cfg, counts)      # forward/backward, grads finished

Every stage runs `forward_step` on every micro-batch: it builds the model input (rl.logprobs), binds
routing replay for this chunk's routers (rl.routing) and calls the chunk; the schedule moves
activations between stages. The last stage turns logits into log-probs: a log-prob pass collects them
(`collect_non_loss_data`), the training pass returns MCore's per-token-loss triple (loss numerator,
loss units, metrics): the units are this micro-batch's share of the aggregation's denominator (its
response tokens for token-mean, its rows for the seq-mean variants, counted once per context-parallel
group), and `finalize_model_grads` divides the summed gradients by their global sum (rl.stack).
Results travel to global rank 0 (the rank the driver talks to) by `gather_object` from the last stage's
ranks that hold distinct rows (TP rank 0 and CP rank 0 of each data-parallel rank).

Micro-batches: this rank's rows in slices of `size`, each cut to the longest row of the same slice on
ANY data-parallel rank: MoE token dispatch across expert-parallel ranks (the allgather dispatcher)
gathers equal token counts, and packed micro-batches are padded to the largest pack for the same
reason (`equal_packs`). Between pipeline stages the 1F1B schedule exchanges each micro-batch's shape
first (`variable_seq_lengths`); the interleaved schedule (virtual stages) deadlocks doing so in
megatron-core 0.16.1 (in `_communicate_shapes`, measured), so with virtual stages every micro-batch of
a pass is cut to one length (`one_length`) and the shapes are fixed. Shape legend: B rows of the mini-batch, b rows of a micro-batch, S tokens,
T = S - 1 predicted positions, n router tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from rl.grpo import grpo_loss, loss_units
from rl.logprobs import model_input

SUM_KEYS = ("pg_loss", "loss", "computed_positions", "padding_positions")


@dataclass
class MicroBatch:
    rows: slice
    """rows of the mini-batch (global indices)"""
    L: int
    """tokens kept per row (the longest row of this micro-batch index on any data-parallel rank)"""
    total: Optional[int]
    """with equal packs: the largest pack of this micro-batch index on any data-parallel rank"""
    data: dict
    """the batch's tensors for these rows, cut to L tokens (L - 1 predicted positions)"""


def micro_batches(batch: dict, size: int, dp: int, dp_rank: int, equal_packs: bool,
                  one_length: bool = False) -> list[MicroBatch]:
    """This data-parallel rank's micro-batches of `batch` (module docstring); `one_length` cuts them
    all to the longest row of the batch (and packs to the largest pack): fixed activation shapes."""
    if size < 1:
        raise ValueError(f"run.micro_batch_size={size}: must be >= 1")
    lengths_B = batch["lengths_B"]
    B = lengths_B.shape[0]
    if B % dp:
        raise ValueError(f"mini-batch of {B} sequences does not split over model.dp={dp}; make "
                         "data.prompts_per_step * rollout.n / run.mini_batches divisible by dp")
    per = B // dp
    out = []
    starts = range(0, per, size)
    spans = [[slice(d * per + i, d * per + min(per, i + size)) for d in range(dp)] for i in starts]
    for span in spans:
        L = max(int(lengths_B[s].max()) for s in (sum(spans, []) if one_length else span))
        total = (max(int(lengths_B[s].sum()) for s in (sum(spans, []) if one_length else span))
                 if equal_packs or one_length else None)
        rows = span[dp_rank]
        data = {}
        for k, v in batch.items():
            if not isinstance(v, torch.Tensor):
                data[k] = v
            elif k.endswith("_BT"):
                data[k] = v[rows, : L - 1]
            elif k.endswith(("_BS", "_BSLK")):
                data[k] = v[rows, :L]
            else:
                data[k] = v[rows]
        out.append(MicroBatch(rows, L, total, data))
    return out


# ------------------------------------------------------------------------------ forward step
def _forward_step(policy, with_grad: bool, state: dict, data_iterator, model):
    """MCore's forward_step_func: one micro-batch through one chunk; returns (output, loss function)."""
    mb = next(data_iterator)
    d = mb.data
    inp = model_input(d["tokens_BS"], d["lengths_B"], packing_on=policy.sec.packing,
                      sequence_parallel=policy.sequence_parallel, total=mb.total)
    replay = policy.replays.get(id(_unwrap(model))) if policy.replays else None
    if replay is not None and replay.mode is not None:
        replay.feed(d.get("routes_BSLK"), *inp.router_tokens(policy.sequence_parallel), d["lengths_B"])
    with torch.set_grad_enabled(with_grad):
        out = model(inp.tokens, inp.positions, inp.mask, packed_seq_params=inp.packed)
    return out, partial(state["loss"], mb, inp)


def _unwrap(module):
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module


def _run(policy, chunks, mbs: list[MicroBatch], loss, forward_only: bool) -> list:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not mbs:
        return []
    step = partial(_forward_step, policy, not forward_only, {"loss": loss})
    iters = [iter(mbs) for _ in chunks] if len(chunks) > 1 else iter(mbs)
    vpp = len(chunks)
    pp = policy.sec.pp
    if vpp > 1 and len(mbs) % pp:
        raise ValueError(f"model.vpp={vpp}: the interleaved schedule needs the micro-batches per step ({len(mbs)}) "
                         f"to be a multiple of model.pp={pp}; change run.micro_batch_size or the batch size")
    if vpp > 1 and len({mb.rows.stop - mb.rows.start for mb in mbs}) > 1:
        raise ValueError(f"model.vpp={vpp}: the interleaved schedule needs micro-batches of one size; make the rows "
                         f"per data-parallel rank a multiple of run.micro_batch_size (got {[mb.rows for mb in mbs]})")
    # the activation shape between stages: fixed with virtual stages (all micro-batches alike), else
    # exchanged per micro-batch (variable_seq_lengths) and these two only size the first receive
    d = mbs[0].data
    probe = model_input(d["tokens_BS"], d["lengths_B"], packing_on=policy.sec.packing,
                        sequence_parallel=policy.sequence_parallel, total=mbs[0].total).tokens
    fb = get_forward_backward_func()
    return fb(forward_step_func=step, data_iterator=iters, model=chunks if vpp > 1 else chunks[0],
              num_microbatches=len(mbs), seq_length=probe.shape[1] * policy.sec.cp, micro_batch_size=probe.shape[0],
              forward_only=forward_only, collect_non_loss_data=forward_only)


def _holds_distinct_rows() -> bool:
    """Last stage, TP rank 0, CP rank 0: one copy of each data-parallel rank's results."""
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0)


def to_rank0(payload):
    """`payload` of every rank, gathered at global rank 0 (a list there, None elsewhere)."""
    if dist.get_world_size() == 1:
        return [payload]
    got = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(payload, got, dst=0)
    return got


def from_rank0(obj):
    """Global rank 0's `obj` on every rank (for callers that need a pass's result everywhere)."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------ log-prob pass
def logprob_pass(policy, chunks, mbs: list[MicroBatch], with_entropy: bool):
    """Forward only: [(rows, logp_bT, entropy_bT or None, computed positions)] of every micro-batch of
    every data-parallel rank, at global rank 0 (None elsewhere)."""
    def collect(mb, inp, logits, non_loss_data=False):
        lp, ent = inp.logprobs(logits, policy.m.vocab_size, with_entropy)
        return mb.rows, lp.float().cpu(), (ent.float().cpu() if ent is not None else None), inp.computed

    with torch.no_grad():
        store = _run(policy, chunks, mbs, collect, forward_only=True)
    got = to_rank0(store if _holds_distinct_rows() else None)
    return None if got is None else [item for part in got if part for item in part]


# ------------------------------------------------------------------------------ training pass
def train_pass(policy, stack, mbs: list[MicroBatch], loss_cfg, counts: dict) -> Optional[list[dict]]:
    """Forward and backward of the GRPO loss over this rank's micro-batches; gradients finished by
    `finalize_model_grads` (summed over data parallel, divided by the global loss units). Returns
    every last-stage rank's per-micro-batch metrics at global rank 0 (None elsewhere); `counts` holds
    the global num_tokens / num_seqs the logged losses are normalised by."""
    from megatron.core import parallel_state as ps

    first_cp = ps.get_context_parallel_rank() == 0
    denominator = counts["num_tokens"] if loss_cfg.aggregation == "token-mean" else counts["num_seqs"]

    def loss(mb, inp, logits):
        d = mb.data
        logp, ent = inp.logprobs(logits, policy.m.vocab_size, with_entropy=True)
        if loss_cfg.entropy_coef <= 0:
            ent = ent.detach()
        dev = logp.device
        cut = lambda k: None if d.get(k) is None else d[k].to(dev)  # noqa: E731
        numerator, metrics = grpo_loss(loss_cfg, logp_BT=logp, adv_B=d["adv_B"].to(dev), mask_BT=cut("mask_BT"),
                                       old_logp_BT=cut("old_logp_BT"), ref_logp_BT=cut("ref_logp_BT"),
                                       rollout_logp_BT=cut("rollout_logp_BT"), entropy_BT=ent,
                                       num_tokens=1.0, num_seqs=1.0)
        units = loss_units(loss_cfg, d["mask_BT"]) if first_cp else 0
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["loss"] /= denominator
        metrics["pg_loss"] /= denominator
        metrics.update(computed_positions=inp.computed, padding_positions=inp.computed - int(d["lengths_B"].sum()),
                       tokens=int(d["mask_BT"].sum()))
        return numerator, torch.tensor(units, dtype=torch.int, device=dev), metrics

    store = _run(policy, stack.chunks, mbs, loss, forward_only=False)
    got = to_rank0(store if _holds_distinct_rows() else None)
    return None if got is None else [m for part in got if part for m in part]


def reduce_metrics(per_micro_batch: list[dict]) -> dict[str, float]:
    """Token-weighted means of the micro-batches' metrics; sums for losses and positions; maxima for *_max."""
    sums, maxes, tokens = {}, {}, 0
    for metrics in per_micro_batch:
        n = metrics.pop("tokens")
        for k, v in metrics.items():
            if k.endswith("_max"):
                maxes[k] = max(maxes.get(k, float("-inf")), v)
            else:
                sums[k] = sums.get(k, 0.0) + (v if k in SUM_KEYS else v * n)
        tokens += n
    out = {k: v if k in SUM_KEYS else v / max(tokens, 1) for k, v in sums.items()}
    out.update(maxes)
    return out
