"""Two local-spec modules Megatron-Core 0.16.1 lacks off-GPU, and the spec walk that plugs them in.

* ``SDPACoreAttention``: core attention on ``torch.nn.functional.scaled_dot_product_attention``
  that accepts MLA's ``k_channels``/``v_channels`` (the local ``DotProductAttention`` does not,
  so a local-spec MLA model cannot be built without it), and packed sequences (MCore's ``thd``
  format, ``PackedSeqParams.cu_seqlens_q``), which the local ``DotProductAttention`` refuses: each
  packed sequence attends causally to itself only, one SDPA call per sequence, so no
  block-diagonal [t, t] mask is built (memory O(longest sequence^2) per head, not O(t^2)).
  It also implements the two attention variants gpt-oss needs, read from the same
  ``TransformerConfig`` fields as the stock ``DotProductAttention``:
  - a sliding window (``window_size=(left, right)`` on the layers ``window_attn_skip_freq``
    selects, MCore's ``is_layer_window_attention``): query i sees keys i-left..i+right (and the
    causal mask); -1 is unbounded. The stock module builds that mask with ``device="cuda"``;
  - attention sinks (``softmax_type``: "learnable" = a per-head logit ``softmax_offset`` [heads
    of this TP rank] that joins every row's softmax and takes its share of the weight without
    contributing a value; "off-by-one" = the same with a fixed 0): the stock module's
    ``SoftmaxOne``. Computed in float32 with an explicit score matrix (SDPA has no sink term);
    the plain SDPA path is unchanged for every model without a sink.
* ``TorchNorm``: RMSNorm / LayerNorm with what MCore's torch-norm wrapper (``WrappedTorchNorm``)
  asserts off: ``sequence_parallel=True`` (MoE with TP > 1 requires it; the weight is tagged
  ``sequence_parallel`` so MCore's grad finalisation all-reduces it across TP) and a zero-centred
  gamma (``layernorm_zero_centered_gamma``: ``norm(x) * (1 + w)``, computed in float32 as Gemma's
  RMSNorm and Transformer Engine's norms do; Megatron-LM's ``--apply-layernorm-1p``).

Parameter names are unchanged (``weight``/``bias``, ``softmax_offset`` split over TP by heads), so
checkpoints are identical to the stock local spec. Without this module: local-spec MLA fails at
construction, MoE+TP fails at construction, a sliding window fails on CPU, a zero-centred gamma fails
at construction.

Features, not patches (``runtime.patches`` lists why): both are modules the local spec lacks,
plugged in through the layer spec, MCore's own extension point; nothing of MCore is replaced.
``SDPACoreAttention`` serves every local-spec model (and ``runtime.cp_attention`` builds on it),
so it would stay if ``DotProductAttention`` accepted ``k_channels``; the torch norm refuses
sequence parallelism by design (``WrappedTorchNorm`` asserts it off), not by mistake.

Shape legend (attention): b batch, h heads of this rank, q/k query/key positions, d head dim.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """Shapes: query ``[sq, b, np, hk]``, key ``[sk, b, ng, hk]``, value ``[sk, b, ng, hv]``
    -> ``[sq, b, np * hv]``; ``attention_mask`` True where blocked (MCore convention)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise NotImplementedError("SDPACoreAttention does not implement context parallelism")
        k_channels = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(k_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.tp_group = getattr(pg_collection, "tp", None)  # None: MCore's global TP group, when needed
        self.window = _layer_window(config, layer_number)
        self.softmax_offset = _softmax_offset(config, self.tp_group)
        if (self.window is not None or config.softmax_type != "vanilla") \
                and type(self).forward is not SDPACoreAttention.forward:
            raise NotImplementedError(
                f"{type(self).__name__}: config.window_size / softmax_type={config.softmax_type!r} (sliding window, "
                "attention sinks) are implemented by SDPACoreAttention.forward only; this subclass would ignore them")

    @classmethod
    def accepts_packed_sequences(cls) -> bool:
        """True when ``forward`` is this class's (which takes ``thd`` packed sequences); a subclass
        that overrides it (``runtime.cp_attention.CPCoreAttention``) does not inherit the claim."""
        return cls.forward is SDPACoreAttention.forward

    @property
    def plain(self) -> bool:
        """No window and no sink: the SDPA path every other model takes."""
        return self.window is None and self.config.softmax_type == "vanilla"

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: attention bias")
        if packed_seq_params is not None:
            return self._forward_packed(query, key, value, packed_seq_params)
        sq, b, nq, _ = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if k.shape[1] != nq:
            k = k.repeat_interleave(nq // k.shape[1], dim=1)
            v = v.repeat_interleave(nq // v.shape[1], dim=1)
        if self.plain:
            mask = None if attention_mask is None else ~attention_mask
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=attention_mask is None,
                dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale)
        else:
            blocked = attention_mask if attention_mask is not None else _causal_blocked(sq, k.shape[2], q.device)
            out = self._attend(q, k, v, blocked)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _attend(self, q_bhqd, k_bhkd, v_bhkd, blocked):
        """Attention with this layer's window and sink; ``blocked`` [.., q, k] True = masked."""
        if self.window is not None:
            blocked = blocked | _outside_window(q_bhqd.shape[2], k_bhkd.shape[2], self.window, q_bhqd.device)
        dropout = self.dropout_p if self.training else 0.0
        if self.config.softmax_type == "vanilla":
            return F.scaled_dot_product_attention(q_bhqd, k_bhkd, v_bhkd, attn_mask=~blocked, dropout_p=dropout,
                                                  scale=self.softmax_scale)
        scores_bhqk = torch.matmul(q_bhqd.float(), k_bhkd.float().transpose(-1, -2)) * self.softmax_scale
        scores_bhqk = scores_bhqk.masked_fill(blocked, torch.finfo(torch.float32).min)
        offset_h = self.softmax_offset if self.softmax_offset is not None else scores_bhqk.new_zeros(q_bhqd.shape[1])
        sink_bhq1 = offset_h.float().reshape(1, -1, 1, 1).expand(*scores_bhqk.shape[:3], 1)
        probs_bhqk = torch.softmax(torch.cat([scores_bhqk, sink_bhq1], dim=-1), dim=-1)[..., :-1]
        probs_bhqk = F.dropout(probs_bhqk, dropout) if dropout else probs_bhqk
        return torch.matmul(probs_bhqk.to(v_bhkd.dtype), v_bhkd)

    def _forward_packed(self, query, key, value, packed_seq_params):
        """``thd``: query ``[t, np, hk]``, key/value ``[t, ng, h]`` -> ``[t, np * hv]``; sequence i
        is rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``, causal within itself, blind to the others."""
        if packed_seq_params.qkv_format != "thd":
            raise NotImplementedError(f"SDPACoreAttention: packed format {packed_seq_params.qkv_format!r} "
                                      "(only 'thd')")
        cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
        if cu_kv is not None and not torch.equal(cu_q, cu_kv):
            raise NotImplementedError("SDPACoreAttention: packed self-attention needs cu_seqlens_kv == cu_seqlens_q")
        t, nq, _ = query.shape
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))  # [1, heads, t, d]
        if k.shape[1] != nq:
            k = k.repeat_interleave(nq // k.shape[1], dim=1)
            v = v.repeat_interleave(nq // v.shape[1], dim=1)
        bounds = cu_q.tolist()
        if bounds[0] != 0 or bounds[-1] != t:
            raise ValueError(f"SDPACoreAttention: cu_seqlens_q runs {bounds[0]}..{bounds[-1]} but {t} tokens "
                             "were packed; it must run 0..t")
        if self.plain:
            outs = [F.scaled_dot_product_attention(
                        q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], is_causal=True,
                        dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale)
                    for a, e in zip(bounds[:-1], bounds[1:]) if e > a]
        else:
            outs = [self._attend(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], _causal_blocked(e - a, e - a, q.device))
                    for a, e in zip(bounds[:-1], bounds[1:]) if e > a]
        return torch.cat(outs, dim=2)[0].permute(1, 0, 2).reshape(t, -1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """``softmax_offset`` split over TP by heads, as ``DotProductAttention`` stores it."""
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, \
            make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True) if self.softmax_offset is not None else {}
        return make_sharded_tensors_for_checkpoint(state, prefix, {"softmax_offset": 0}, sharded_offsets,
                                                   tp_group=_tp_group(self.tp_group),
                                                   dp_cp_group=metadata["dp_cp_group"])


def _layer_window(config, layer_number: int):
    """``(left, right)`` if this layer (1-based, as MCore counts) slides, else None."""
    from megatron.core.transformer.utils import is_layer_window_attention

    window = config.window_size
    return tuple(window) if is_layer_window_attention(window, config.window_attn_skip_freq, layer_number) else None


def _tp_group(group):
    if group is not None:
        return group
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def _softmax_offset(config, tp_group):
    """The learnable sink logits of this TP rank's heads (None for "vanilla" / "off-by-one")."""
    if config.softmax_type not in ("vanilla", "off-by-one", "learnable"):
        raise ValueError(f"SDPACoreAttention: softmax_type={config.softmax_type!r} is not one of vanilla, "
                         "off-by-one, learnable")
    if config.softmax_type != "learnable":
        return None
    offset = torch.nn.Parameter(torch.empty(config.num_attention_heads // _tp_group(tp_group).size(),
                                            dtype=config.params_dtype))
    if config.perform_initialization:
        config.init_method(offset.data)
    return offset


def _causal_blocked(sq: int, sk: int, device) -> torch.Tensor:
    """[sq, sk] True where key j lies after query i (the last query is aligned with the last key)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)


def _outside_window(sq: int, sk: int, window, device) -> torch.Tensor:
    """[sq, sk] True where key j is outside query i's window ``(left, right)``; -1 = unbounded."""
    left, right = window
    offset_qk = (torch.arange(sk, device=device)[None, :] - torch.arange(sq, device=device)[:, None]) - (sk - sq)
    outside = torch.zeros(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        outside |= offset_qk < -left
    if right >= 0:
        outside |= offset_qk > right
    return outside


class TorchNorm(torch.nn.Module):
    """``config.normalization`` (RMSNorm or LayerNorm) with sequence-parallel grad tagging and,
    with ``config.layernorm_zero_centered_gamma``, a zero-centred gamma (weight 0 = identity)."""

    def __init__(self, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                 zero_centered_gamma=False, normalization=None):
        super().__init__()
        self.kind = normalization or config.normalization
        if self.kind not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"TorchNorm supports RMSNorm/LayerNorm, not {self.kind}")
        self.eps = eps
        self.zero_centered = bool(zero_centered_gamma or config.layernorm_zero_centered_gamma)
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
                     if self.kind == "LayerNorm" else None)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        shape = (x.shape[-1],)
        if self.zero_centered:
            return self._zero_centered(x)
        if self.kind == "RMSNorm":
            return F.rms_norm(x, shape, self.weight, self.eps)
        return F.layer_norm(x, shape, self.weight, self.bias, self.eps)

    def _zero_centered(self, x):
        """``norm(x) * (1 + w)`` in float32, cast back to x's dtype (transformers' ``Gemma3RMSNorm``:
        "(x * w).to(float16)", not "x.to(float16) * w")."""
        x32 = x.float()
        gain = 1.0 + self.weight.float()
        if self.kind == "RMSNorm":
            y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * gain
        else:
            y = F.layer_norm(x32, (x.shape[-1],), gain, self.bias.float(), self.eps)
        return y.to(x.dtype)


def substitute_local_modules(block_spec, config):
    """Return a copy of a local-spec block spec with the CPU-capable modules swapped in."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    swaps = {DotProductAttention: SDPACoreAttention}
    if config.sequence_parallel or config.layernorm_zero_centered_gamma:
        swaps[WrappedTorchNorm] = TorchNorm
    return _walk(block_spec, swaps)


def _walk(obj, swaps):
    if isinstance(obj, type):
        return swaps.get(obj, obj)
    if isinstance(obj, list):
        return [_walk(x, swaps) for x in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _walk(getattr(obj, f.name), swaps) for f in dataclasses.fields(obj)
                   if f.name != "params"}
        return dataclasses.replace(obj, **changes)
    return obj
