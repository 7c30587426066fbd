"""Sequence packing for the policy forward: the rows of a micro-batch laid end to end in one
sequence with boundaries (Megatron-Core's ``thd`` format, ``PackedSeqParams.cu_seqlens``), so the
padding that right-padding every row to the longest would add is never computed.

    p = pack(tokens_bS, lengths_b, multiple=tp_sp)     # tokens_1t, positions_1t, cu_seqlens_n, ...
    logits = model(p.tokens_1t, p.positions_1t, None, packed_seq_params=p.params())
    logp_bT = unpack(logp_1t, p, T)                     # back to the padded row layout, zeros past each row

How the model keeps packed sequences apart (megatron-core 0.16.1, checked in its source):
  * attention: the core attention receives ``packed_seq_params`` and must attend within each
    sequence. The local spec's ``runtime.modules.SDPACoreAttention`` does (one causal SDPA call per
    sequence); TE's ``TEDotProductAttention`` does (flash / cuDNN ``thd`` kernels, GPU); MCore's local
    ``DotProductAttention`` asserts it off, and ``runtime.cp_attention.CPCoreAttention`` refuses it.
    ``check_model`` names a core attention that cannot, at start-up.
  * rotary embedding: ``GPTModel`` builds the rope table for ``max(max_seqlen_q, max_seqlen_kv)``
    positions and, for ``thd``, ``rope_utils._apply_rotary_pos_emb_thd`` gives every sequence the
    positions 0..len-1 (split by ``cu_seqlens``), a plain-torch path that runs on CPU. The CUDA-only
    path is the fused ``fused_apply_rotary_pos_emb_thd`` (TE), used only with ``apply_rope_fusion``,
    which this repository leaves off. One trap: when the table length equals the packed length
    (``max_seqlen == cu_seqlens[-1]``) MCore switches to "exact mapping" with per-sequence offsets
    (positions continue across sequences); that happens only when one sequence fills the pack, and
    then its offset is 0. ``position_ids`` restart per sequence here too, though a rope model ignores them.
  * MLA (DeepSeek-V3) takes ``thd`` on its own path (``MLASelfAttention``), rope unfused likewise.
  * Context parallelism would need each sequence cut into 2*cp chunks (``cu_seqlens_q_padded``);
    not built: ``model.packing`` with ``model.cp > 1`` is a config error.
The tail of a pack (to make its length a multiple of the TP size under sequence parallelism, or
equal across data-parallel ranks for MoE token dispatch) is one more sequence of pad tokens.
Leaves out: choosing which rows share a pack (the trainer packs each micro-batch of
run.micro_batch_size rows; a token budget per pack is a possible next step).
Without it every micro-batch computes rows x longest positions (``train/pad_frac`` shows the share).

Shape legend: b rows, S longest row, T = S - 1 predicted positions, t packed tokens, n = sequences + 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Packed:
    tokens_1t: Tensor
    """the rows' real tokens end to end, then the pad tail (token 0)"""
    positions_1t: Tensor
    """position of each token within its own sequence (restarts at 0)"""
    cu_seqlens_n: Tensor
    """int32 boundaries: sequence i is tokens cu[i]:cu[i+1]; the pad tail, if any, is the last one"""
    max_seqlen: int
    """longest sequence in the pack (the rope table length)"""
    lengths_b: tuple[int, ...]
    """real tokens of each row"""

    @property
    def real(self) -> int:
        return sum(self.lengths_b)

    @property
    def computed(self) -> int:
        return int(self.tokens_1t.shape[1])

    def params(self, device=None):
        """MCore's ``PackedSeqParams`` for this pack (self-attention: q and kv share the boundaries)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens_n.to(device) if device is not None else self.cu_seqlens_n
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)


def pack(tokens_bS: Tensor, lengths_b: Tensor, *, multiple: int = 1, total: int | None = None) -> Packed:
    """The rows' first lengths_b[i] tokens end to end; the pack is padded with a tail sequence to at
    least `total` tokens and to a multiple of `multiple`."""
    lengths = [int(n) for n in lengths_b.tolist()]
    if any(n < 1 or n > tokens_bS.shape[1] for n in lengths):
        raise ValueError(f"pack: row lengths {lengths} must lie in 1..{tokens_bS.shape[1]} (the tokens' width)")
    real = sum(lengths)
    t = int(math.ceil(max(real, total or 0) / multiple) * multiple)
    tail = t - real
    seqlens = lengths + ([tail] if tail else [])
    tokens = [tokens_bS[i, :n] for i, n in enumerate(lengths)] + [tokens_bS.new_zeros(tail)]
    positions = [torch.arange(n) for n in seqlens]
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
    return Packed(torch.cat(tokens)[None], torch.cat(positions)[None], cu, max(seqlens), tuple(lengths))


def unpack(x_1t: Tensor, p: Packed, T: int) -> Tensor:
    """Per-position values of a pack back to rows, x_bT: row i, position t < lengths[i] - 1 holds
    x at cu[i] + t (the prediction of its token t + 1); later positions are 0."""
    b = len(p.lengths_b)
    t_T = torch.arange(T, device=x_1t.device)
    start_b = p.cu_seqlens_n[:b].to(device=x_1t.device, dtype=torch.long)
    valid_bT = t_T[None, :] < (torch.tensor(p.lengths_b, device=x_1t.device)[:, None] - 1)
    idx_bT = torch.where(valid_bT, start_b[:, None] + t_T[None, :], torch.zeros_like(valid_bT, dtype=torch.long))
    out_bT = x_1t[0][idx_bT]
    return torch.where(valid_bT, out_bT, torch.zeros_like(out_bT))


def labels(p: Packed) -> Tensor:
    """labels_1t[j] = the token after j in the pack; across a boundary it is the next sequence's
    first token, a prediction `unpack` never reads."""
    return torch.nn.functional.pad(p.tokens_1t[:, 1:], (0, 1))


def rows(p: Packed) -> Tensor:
    """int64 [1, t]: the row each packed token comes from; -1 on the pad tail."""
    lengths = torch.tensor(p.lengths_b, dtype=torch.long)
    inside = torch.repeat_interleave(torch.arange(len(p.lengths_b)), lengths)
    return torch.cat([inside, torch.full((p.computed - p.real,), -1, dtype=torch.long)])[None]


def padded_positions(lengths_b: Tensor, width: int) -> tuple[int, int]:
    """(computed positions, real tokens) of a right-padded micro-batch whose rows are `width` wide."""
    return int(lengths_b.shape[0]) * width, int(lengths_b.sum())


# ------------------------------------------------------------------------------ start-up check
def check_model(model, spec: str) -> None:
    """Raise a one-line error when a core attention of `model` cannot keep packed sequences apart."""
    from runtime.modules import SDPACoreAttention

    accepted = [SDPACoreAttention]
    try:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention
    except ImportError:  # no Transformer Engine: the te spec cannot be built either
        TEDotProductAttention = None
    if isinstance(TEDotProductAttention, type):  # a stand-in when TE is absent, never a module of a model
        accepted.append(TEDotProductAttention)
    bad = sorted({type(m).__name__ for name, m in model.named_modules()
                  if name.endswith("core_attention") and not _accepts(m, accepted)})
    if bad:
        raise ValueError(f"model.packing=true, but the core attention {', '.join(bad)} (model.spec={spec!r}) "
                         "cannot attend within packed sequences (thd / cu_seqlens); set model.packing=false")


def _accepts(module, accepted) -> bool:
    from runtime.modules import SDPACoreAttention

    if isinstance(module, SDPACoreAttention):
        return type(module).accepts_packed_sequences()
    return isinstance(module, tuple(accepted))
