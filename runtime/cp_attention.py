"""Context parallelism (CP) for the local (non-TE) spec on any device: core attention and sequence
split/gather. A feature the local spec lacks (its ``DotProductAttention`` has no CP), not a patch
of an upstream defect: it stays even once upstream's defects are fixed. The one defect on this
path, MCore's CUDA-only rotary slicing, is the patch ``cp_rope_on_cpu`` (``runtime.patches``).

How MCore lays out a CP batch (the "load-balanced" layout of Megatron-LM's
`get_batch_on_this_cp_rank`): the sequence is cut into 2*cp equal chunks and CP rank r holds
chunks r and 2*cp-1-r, so that every rank gets the same amount of causal-attention work.
`GPTModel` expects its inputs already in that layout; its rotary embedding is built for the full
length and sliced the same way (`get_pos_emb_on_this_cp_rank`).

* `CPCoreAttention`: gathers K and V from the CP group (backward: reduce-scatter of their
  gradients), builds the causal mask from the chunks' global positions, and attends with
  `scaled_dot_product_attention`. All-gather attention, not ring attention: memory O(S) for K/V
  per rank, fine for RL sequence lengths; the TE spec (GPU) brings its own ring attention.
  Only causal masks (the `attention_mask` argument is ignored: padding is on the right, so a
  causal mask never lets real tokens see pads).
* `cp_split(x_BS)` / `cp_gather(y_Bs)`: take this rank's chunks of a [B, S] tensor; gather the
  per-rank results back to [B, S] in sequence order. `cp_gather`'s backward hands each rank the
  gradient of its own chunks only: every CP rank computes the same loss from the gathered
  tensor, so summing parameter gradients over the CP group (as the trainer does) counts each
  token once.

Shape legend: B batch, S full (padded) sequence length, s = S / cp local length, c = S / (2 cp)
chunk length; attention tensors follow MCore: [s, b, heads, head_dim].
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from runtime.modules import SDPACoreAttention


# ------------------------------------------------------------------------------ layout
def chunk_ids(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two chunk indices CP rank `cp_rank` holds."""
    return cp_rank, 2 * cp - 1 - cp_rank


def local_positions(S: int, cp_rank: int, cp: int, device=None) -> torch.Tensor:
    """Global positions [s] of the tokens this CP rank holds, in its local order."""
    c = S // (2 * cp)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in chunk_ids(cp_rank, cp)])


def cp_split(x_BS: torch.Tensor, cp_rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This rank's chunks of `x` along `dim` (S must be divisible by 2 * cp)."""
    S = x_BS.shape[dim]
    if S % (2 * cp):
        raise ValueError(f"cp_split: sequence length {S} is not divisible by 2*cp = {2 * cp}; pad it first")
    chunks = x_BS.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[i] for i in chunk_ids(cp_rank, cp)], dim=dim)


class _GatherSeq(torch.autograd.Function):
    """All-gather [B, s] pieces into [B, S] in sequence order; backward keeps this rank's part."""

    @staticmethod
    def forward(ctx, y_Bs, group):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.rank, ctx.cp = rank, cp
        parts = [torch.empty_like(y_Bs) for _ in range(cp)]
        dist.all_gather(parts, y_Bs.contiguous(), group=group)
        chunks: list = [None] * (2 * cp)
        for r, part in enumerate(parts):
            a, b = part.chunk(2, dim=1)
            i, j = chunk_ids(r, cp)
            chunks[i], chunks[j] = a, b
        return torch.cat(chunks, dim=1)

    @staticmethod
    def backward(ctx, g_BS):
        return cp_split(g_BS, ctx.rank, ctx.cp), None


def cp_gather(y_Bs: torch.Tensor, group) -> torch.Tensor:
    """[B, s] per CP rank -> [B, S] on every CP rank (differentiable, see module docstring)."""
    return _GatherSeq.apply(y_Bs, group)


class _GatherKV(torch.autograd.Function):
    """All-gather along dim 0 (rank order); backward reduce-scatters (sums) the gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        world = dist.get_world_size(ctx.group)
        out = g.new_empty((g.shape[0] // world, *g.shape[1:]))
        dist.reduce_scatter_tensor(out, g.contiguous(), group=ctx.group)
        return out, None


# ------------------------------------------------------------------------------ attention
class CPCoreAttention(SDPACoreAttention):
    """`SDPACoreAttention` for context parallelism: query [s, b, nq, hk], key [s, b, ng, hk],
    value [s, b, ng, hv] (this rank's chunks) -> [s, b, nq * hv]."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 cp_comm_type=None, pg_collection=None):
        cp = config.context_parallel_size
        config_cp1 = _with_cp(config, 1)  # the parent refuses CP > 1; it only reads scalars
        super().__init__(config_cp1, layer_number, attn_mask_type, attention_type,
                         attention_dropout, softmax_scale, k_channels, v_channels, cp_comm_type,
                         pg_collection)
        self.config = config
        self.cp = cp

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("CPCoreAttention: packed sequences / attention bias")
        from megatron.core import parallel_state as ps

        group = ps.get_context_parallel_group()
        rank = ps.get_context_parallel_rank()
        s, b, nq, _ = query.shape
        key, value = _GatherKV.apply(key, group), _GatherKV.apply(value, group)
        S = s * self.cp
        q_pos = local_positions(S, rank, self.cp, query.device)
        k_pos = torch.cat([local_positions(S, r, self.cp, query.device) for r in range(self.cp)])
        allowed_sS = k_pos[None, :] <= q_pos[:, None]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, len, d]
        if k.shape[1] != nq:
            k = k.repeat_interleave(nq // k.shape[1], dim=1)
            v = v.repeat_interleave(nq // v.shape[1], dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed_sS, dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _with_cp(config, cp: int):
    import copy

    c = copy.copy(config)
    object.__setattr__(c, "context_parallel_size", cp)
    return c


def substitute_cp_attention(block_spec):
    """A copy of a local block spec whose core attention is `CPCoreAttention`."""
    from runtime.modules import _walk

    return _walk(block_spec, {SDPACoreAttention: CPCoreAttention})


# ------------------------------------------------------------------------------ padding
def padded_length(S: int, cp: int, tp_sequence_parallel: int = 1) -> int:
    """Smallest length >= S that CP (2*cp chunks) and sequence parallelism (tp) can split."""
    m = 2 * cp * tp_sequence_parallel if cp > 1 else tp_sequence_parallel
    return int(math.ceil(S / m) * m)
