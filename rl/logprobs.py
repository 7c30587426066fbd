"""Per-token log-probabilities and entropies of token sequences under an MCore `GPTModel`, with the
vocabulary split over tensor parallelism and the sequence split over context parallelism, in two
halves so that a pipeline schedule can run them on different stages:

    inp = model_input(tokens_bS, lengths_b, packing=False, sequence_parallel=sp)   # every stage
    logits = model(inp.tokens, inp.positions, inp.mask, packed_seq_params=inp.packed)
    logp_bT, ent_bT = inp.logprobs(logits, vocab_size, with_entropy=True)          # the last stage

`logp_bT[b, t] = log p(tokens[b, t + 1] | tokens[b, : t + 1])`, T = S - 1, for every position before a
row's last token, 0 after it; the caller masks what it does not need (prompt tokens). Rows are either
right-padded to the width of tokens_bS (the causal mask alone keeps real tokens from seeing pads) or,
with `packing`, laid end to end in one sequence (rl.packing: MCore's THD format), so padding is not
computed; the two agree within fp32 rounding (tests/test_rl_packing.py). `sequence_logprobs` runs both
halves on one model (one stage).

Vocab-parallel log-softmax (each TP rank holds V / tp logit columns): the rank-local max,
sum of exponentials, target logit and sum of p * z are combined with all-reduces whose backward
is the identity (`reduce_from_tensor_model_parallel_region`): every TP rank computes the same
loss, and each needs only d loss / d (its own partial sums). Columns past `vocab_size` (Megatron's
vocabulary padding) are excluded, as vLLM excludes them. Without this the full [B, S, V] logits
would have to be gathered on every rank.

With rollout routing replay (rl.routing) `ModelInput.router_tokens` gives the (row, position) of every
token this rank's MoE routers will see, derived from row and position indices laid out exactly like the
tokens (padding, context-parallel split, packing, sequence parallelism).
Leaves out: packing under context parallelism. Shape legend: b rows, S tokens (padded), T = S - 1
predicted positions, s = S / cp local tokens, v = V_padded / tp local vocabulary columns, t packed tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime import megatron as rt
from runtime import cp_attention
from rl import packing
from rl.routing import router_tokens


def vocab_parallel_logp_entropy(logits_Bsv: torch.Tensor, labels_Bs: torch.Tensor, vocab_size: int,
                                with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(z)[label] and the entropy of softmax(z) over the true vocabulary, in fp32,
    from this TP rank's logit columns."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region as tp_sum

    tp = ps.get_tensor_model_parallel_world_size()
    v = logits_Bsv.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * v
    n_valid = max(0, min(v, vocab_size - start))
    z_Bsv = logits_Bsv[..., :n_valid].float()
    m_Bs = (z_Bsv.detach().amax(-1) if n_valid else
            torch.full(labels_Bs.shape, float("-inf"), device=logits_Bsv.device))
    if tp > 1:
        torch.distributed.all_reduce(m_Bs, op=torch.distributed.ReduceOp.MAX,
                                     group=ps.get_tensor_model_parallel_group())
    z_Bsv = z_Bsv - m_Bs.unsqueeze(-1)
    e_Bsv = torch.exp(z_Bsv)
    sum_Bs = tp_sum(e_Bsv.sum(-1))
    local_Bs = labels_Bs - start
    inside_Bs = (local_Bs >= 0) & (local_Bs < n_valid)
    idx_Bs = torch.where(inside_Bs, local_Bs, torch.zeros_like(local_Bs)).long()
    tgt_Bs = z_Bsv.gather(-1, idx_Bs.unsqueeze(-1)).squeeze(-1) if n_valid else torch.zeros_like(m_Bs)
    tgt_Bs = tp_sum(torch.where(inside_Bs, tgt_Bs, torch.zeros_like(tgt_Bs)))
    log_sum_Bs = torch.log(sum_Bs)
    logp_Bs = tgt_Bs - log_sum_Bs
    if not with_entropy:
        return logp_Bs, None
    ez_Bs = tp_sum((e_Bsv * z_Bsv).sum(-1))
    return logp_Bs, log_sum_Bs - ez_Bs / sum_Bs


@dataclass
class ModelInput:
    """One micro-batch as the model takes it, and how to read its logits back per row."""
    tokens: torch.Tensor
    """[b, s] (padded, CP-split) or [1, t] (packed) token ids"""
    positions: torch.Tensor
    """position ids, laid out like tokens"""
    mask: torch.Tensor | None
    """causal mask (padded, no CP); None when CP attention or packing build their own"""
    packed: object
    """MCore PackedSeqParams (packing) or None"""
    labels: torch.Tensor
    """the next token of every input position, laid out like tokens"""
    rows: torch.Tensor
    """the row of every input position (-1: a pack's pad tail), laid out like tokens"""
    width: int
    """T = S - 1 predicted positions per row in the result"""
    lengths_b: torch.Tensor
    """real tokens per row"""
    pack: object = None
    """the rl.packing.Packed (packing) or None"""
    computed: int = 0
    """token positions the forward computes (real + padding)"""

    def router_tokens(self, sequence_parallel: bool):
        """(row_n, pos_n) of the tokens this rank's MoE routers see (rl.routing)."""
        return router_tokens(self.rows, self.positions, sequence_parallel)

    def logprobs(self, logits, vocab_size: int, with_entropy: bool = True):
        """(logp_bT, entropy_bT or None) from this micro-batch's logits (the last stage's output)."""
        from megatron.core import parallel_state as ps

        logp, ent = vocab_parallel_logp_entropy(logits, self.labels, vocab_size, with_entropy)
        if self.pack is not None:
            return (packing.unpack(logp, self.pack, self.width),
                    packing.unpack(ent, self.pack, self.width) if ent is not None else None)
        if ps.get_context_parallel_world_size() > 1:
            group = ps.get_context_parallel_group()
            logp = cp_attention.cp_gather(logp, group)
            ent = cp_attention.cp_gather(ent, group) if ent is not None else None
        valid_bT = torch.arange(self.width, device=logp.device)[None] < (self.lengths_b.to(logp.device)[:, None] - 1)
        logp = torch.where(valid_bT, logp[:, : self.width], torch.zeros((), device=logp.device, dtype=logp.dtype))
        if ent is not None:
            ent = torch.where(valid_bT, ent[:, : self.width], torch.zeros((), device=ent.device, dtype=ent.dtype))
        return logp, ent


def model_input(tokens_bS: torch.Tensor, lengths_b: torch.Tensor, *, packing_on: bool = False,
                sequence_parallel: bool = False, total: int | None = None) -> ModelInput:
    """The model's input for rows tokens_bS (real lengths lengths_b) at this rank's TP/CP position:
    right-padded (and CP-split), or with `packing_on` packed into at least `total` tokens."""
    from megatron.core import parallel_state as ps

    b, S = tokens_bS.shape
    tp_sp = ps.get_tensor_model_parallel_world_size() if sequence_parallel else 1
    dev = rt.device()
    if packing_on:
        if ps.get_context_parallel_world_size() > 1:
            raise NotImplementedError("packing with context parallelism (model.cp > 1) is not supported; set "
                                      "model.packing=false")
        p = packing.pack(tokens_bS, lengths_b, multiple=tp_sp, total=total)
        return ModelInput(p.tokens_1t.to(dev), p.positions_1t.to(dev), None, p.params(dev), packing.labels(p).to(dev),
                          packing.rows(p).to(dev), S - 1, lengths_b, pack=p, computed=p.computed)
    cp = ps.get_context_parallel_world_size()
    S_pad = cp_attention.padded_length(S, cp, tp_sp)
    tokens = torch.nn.functional.pad(tokens_bS, (0, S_pad - S))
    labels = torch.nn.functional.pad(tokens[:, 1:], (0, 1))
    pos = torch.arange(S_pad)[None].expand(b, -1)
    rows = torch.arange(b)[:, None].expand(b, S_pad)
    mask = None  # CPCoreAttention builds the causal mask from global positions
    if cp > 1:
        rank = ps.get_context_parallel_rank()
        tokens, labels, pos, rows = (cp_attention.cp_split(x, rank, cp) for x in (tokens, labels, pos, rows))
    else:
        mask = rt.causal_mask(S_pad, dev)
    return ModelInput(tokens.to(dev), pos.to(dev), mask, None, labels.to(dev), rows.to(dev), S - 1, lengths_b,
                      computed=b * S_pad)


def sequence_logprobs(model, tokens_bS: torch.Tensor, lengths_b: torch.Tensor | None = None, *, vocab_size: int,
                      with_entropy: bool = True, sequence_parallel: bool = False, packing_on: bool = False,
                      total: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp_bT, entropy_bT) of one model that is the whole pipeline (one stage); differentiable
    when grad is enabled. lengths_b defaults to the full width."""
    if lengths_b is None:
        lengths_b = torch.full((tokens_bS.shape[0],), tokens_bS.shape[1])
    inp = model_input(tokens_bS, lengths_b, packing_on=packing_on, sequence_parallel=sequence_parallel, total=total)
    logits = model(inp.tokens, inp.positions, inp.mask, packed_seq_params=inp.packed)
    return inp.logprobs(logits, vocab_size, with_entropy)
