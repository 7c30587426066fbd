"""Per-token log-probabilities and entropies of token sequences under an MCore `GPTModel`, with the
vocabulary split over tensor parallelism and the sequence split over context parallelism.

    logp_BT, ent_BT = sequence_logprobs(model, tokens_BS, vocab_size=m.vocab_size)

`logp_BT[b, t] = log p(tokens[b, t + 1] | tokens[b, : t + 1])`, T = S - 1, for every position; the
caller masks what it does not need (prompt tokens, padding). Sequences are right-padded, so the
causal mask alone keeps real tokens from seeing pads.

Vocab-parallel log-softmax (each TP rank holds V / tp logit columns): the rank-local max,
sum of exponentials, target logit and sum of p * z are combined with all-reduces whose backward
is the identity (`reduce_from_tensor_model_parallel_region`): every TP rank computes the same
loss, and each needs only d loss / d (its own partial sums). Columns past `vocab_size` (Megatron's
vocabulary padding) are excluded, as vLLM excludes them. Without this the full [B, S, V] logits
would have to be gathered on every rank.

`packed_sequence_logprobs` computes the same from the rows packed end to end (rl.packing: MCore's
THD format), so right-padding is not computed; results agree with the padded path within fp32
rounding (tests/test_rl_packing.py).
With rollout routing replay (rl.routing) both take a `routing` binding and call it, right before the
forward, with the (row, position) of every token this rank's MoE routers will see, derived from row and
position indices laid out exactly like the tokens (padding, context-parallel split, packing).
Leaves out: pipeline parallelism (the last stage computes these; the trainer's schedule is
responsible), packing under context parallelism. Shape legend: B sequences, S tokens (padded),
T = S - 1 predicted positions, s = S / cp local tokens, v = V_padded / tp local vocabulary columns,
t packed tokens.
"""
from __future__ import annotations

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


def sequence_logprobs(model, tokens_BS: torch.Tensor, *, vocab_size: int, with_entropy: bool = True,
                      sequence_parallel: bool = False, routing=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp_BT, entropy_BT) with T = S - 1; differentiable when grad is enabled."""
    from megatron.core import parallel_state as ps

    B, S = tokens_BS.shape
    cp = ps.get_context_parallel_world_size()
    tp_sp = ps.get_tensor_model_parallel_world_size() if sequence_parallel else 1
    S_pad = cp_attention.padded_length(S, cp, tp_sp)
    tokens_BS = torch.nn.functional.pad(tokens_BS, (0, S_pad - S))
    labels_BS = torch.nn.functional.pad(tokens_BS[:, 1:], (0, 1))
    dev = rt.device()
    tokens_BS, labels_BS = tokens_BS.to(dev), labels_BS.to(dev)
    pos_BS = torch.arange(S_pad, device=dev)[None].expand(B, -1)
    rows_BS = torch.arange(B, device=dev)[:, None].expand(B, S_pad)
    if cp > 1:
        rank = ps.get_context_parallel_rank()
        tokens_BS, labels_BS, pos_BS, rows_BS = (cp_attention.cp_split(x, rank, cp)
                                                 for x in (tokens_BS, labels_BS, pos_BS, rows_BS))
        mask = None  # CPCoreAttention builds the causal mask from global positions
    else:
        mask = rt.causal_mask(S_pad, dev)
    if routing is not None:
        routing(*router_tokens(rows_BS, pos_BS, sequence_parallel))
    logits_Bsv = model(tokens_BS, pos_BS, mask)
    logp_Bs, ent_Bs = vocab_parallel_logp_entropy(logits_Bsv, labels_BS, vocab_size, with_entropy)
    if cp > 1:
        group = ps.get_context_parallel_group()
        logp_Bs = cp_attention.cp_gather(logp_Bs, group)
        ent_Bs = cp_attention.cp_gather(ent_Bs, group) if ent_Bs is not None else None
    cut = slice(0, S - 1)
    return logp_Bs[:, cut], (ent_Bs[:, cut] if ent_Bs is not None else None)


def packed_sequence_logprobs(model, tokens_BS: torch.Tensor, lengths_B: torch.Tensor, *, vocab_size: int,
                             with_entropy: bool = True, sequence_parallel: bool = False,
                             total: int | None = None, routing=None) -> tuple[torch.Tensor, torch.Tensor | None, packing.Packed]:
    """(logp_BT, entropy_BT, the pack) like `sequence_logprobs`, from the B rows packed into one
    sequence of at least `total` tokens (equal packs across ranks when the caller needs them);
    positions at or past a row's last token are 0."""
    from megatron.core import parallel_state as ps

    if ps.get_context_parallel_world_size() > 1:
        raise NotImplementedError("packed_sequence_logprobs: context parallelism (model.cp > 1) is not "
                                  "supported with packing; set model.packing=false")
    tp_sp = ps.get_tensor_model_parallel_world_size() if sequence_parallel else 1
    p = packing.pack(tokens_BS, lengths_B, multiple=tp_sp, total=total)
    dev = rt.device()
    if routing is not None:
        routing(*router_tokens(packing.rows(p), p.positions_1t, sequence_parallel))
    logits_1tv = model(p.tokens_1t.to(dev), p.positions_1t.to(dev), None, packed_seq_params=p.params(dev))
    logp_1t, ent_1t = vocab_parallel_logp_entropy(logits_1tv, packing.labels(p).to(dev), vocab_size, with_entropy)
    T = tokens_BS.shape[1] - 1
    return packing.unpack(logp_1t, p, T), (packing.unpack(ent_1t, p, T) if ent_1t is not None else None), p
