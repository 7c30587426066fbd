"""Gemma 3's layer on Megatron-Core 0.16.1: what the stock GPT layer lacks, as modules plugged in
through the layer spec (``layer_spec``, the ``gemma3`` family's ``Family.layer_spec`` hook).

transformers 5.19's ``Gemma3DecoderLayer`` is the truth; each difference from the stock local-spec
``TransformerLayer`` and where it lives here:

* norms compute ``norm(x) * (1 + w)`` (zero-centred gamma, weights stored as HF stores them):
  ``config.layernorm_zero_centered_gamma``, which Megatron-Core's TE norms honour and its torch norm
  refuses; ``runtime.modules.TorchNorm`` honours it and replaces the torch norm everywhere
  (input, pre-MLP, q/k, post and final norms);
* post-attention and post-feed-forward norms (applied to a sublayer's output before the residual
  add): a row-parallel projection followed by a norm (``PostNormRowParallelLinear``), as
  Megatron-Bridge's Gemma3 provider builds them (``TERowParallelLinearLayerNorm``), so the weights
  are ``linear_proj.post_layernorm.weight`` and ``linear_fc2.post_layernorm.weight`` there too;
* a second rope base for the sliding-window layers (``Gemma3SelfAttention``): GPTModel's rotary
  embedding is the global layers' one (``rope_theta``, linear scaling as ``seq_len_interpolation_factor``);
  the sliding layers (those ``config.window_size``/``window_attn_skip_freq`` select, the same predicate
  ``runtime.modules.SDPACoreAttention`` windows by) build their own with ``config.rotary_base_local``;
* the embedding scaled by sqrt(hidden_size), rounded to the activation dtype first as
  transformers does: GPTModel builds its ``LanguageModelEmbedding`` with no hook, so the first decoder
  layer multiplies its input by ``config.embedding_multiplier`` (``Gemma3TransformerLayer``): that
  input is the embedding output and nothing else reads it, so the function is the same (PP included:
  layer 1 lives on the first stage with the embedding). Doing it in the layer keeps every builder
  correct (conversion planning, validate, the trainer's own GPTModel) without a model hook.

``Gemma3TransformerConfig`` carries the two settings TransformerConfig has no field for
(Megatron-Bridge's ``Gemma3ModelProvider`` carries the same as config fields).

Left out: the Transformer Engine spec (no CUDA here to test it: refused), context parallelism
(``SDPACoreAttention`` refuses it), attention logit soft-capping and final logit soft-capping
(null in Gemma 3; the family refuses other values), bidirectional attention (EmbeddingGemma).

Shape legend: s sequence, b batch, h hidden, d head dim.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.utils import is_layer_window_attention

from runtime.modules import TorchNorm


@dataclasses.dataclass
class Gemma3TransformerConfig(TransformerConfig):
    """``TransformerConfig`` plus what Megatron-Core 0.16.1 has no field for."""

    rotary_base_local: Optional[float] = None
    """Rope base of the sliding-window layers (``rope_local_base_freq``); None: the model's one rope."""

    rotary_interpolation_local: Optional[float] = None
    """Linear rope scaling of the sliding-window layers (positions divided by it); None: none."""

    embedding_multiplier: Optional[float] = None
    """The embedding output is multiplied by this in the activation dtype (Gemma: sqrt(hidden_size))."""


def is_sliding(config, layer_number: int) -> bool:
    """Layer ``layer_number`` (1-based, as Megatron-Core counts) has a sliding window."""
    return is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)


class Gemma3TransformerLayer(TransformerLayer):
    """The stock layer; the first one multiplies its input (the embedding) by ``embedding_multiplier``."""

    def __init__(self, config, submodules, layer_number: int = 1, *args, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        multiplier = getattr(config, "embedding_multiplier", None)
        self.input_multiplier = multiplier if self.layer_number == 1 else None

    def _forward_attention(self, hidden_states, *args, **kwargs):
        if self.input_multiplier is not None:
            # transformers: embed(ids) * tensor(sqrt(h)).to(weight dtype): float32, then the activation dtype
            scale = torch.tensor(self.input_multiplier, dtype=torch.float32, device=hidden_states.device)
            hidden_states = hidden_states * scale.to(hidden_states.dtype)
        return super()._forward_attention(hidden_states, *args, **kwargs)


class Gemma3SelfAttention(SelfAttention):
    """``SelfAttention`` whose sliding-window layers rotate q/k with their own rope base."""

    def __init__(self, config, submodules, layer_number, *args, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        base = getattr(config, "rotary_base_local", None)
        self.local_rope = None
        if base is not None and is_sliding(config, self.layer_number):
            self.local_rope = RotaryEmbedding(
                kv_channels=config.kv_channels, rotary_percent=1.0, rotary_interleaved=config.rotary_interleaved,
                seq_len_interpolation_factor=getattr(config, "rotary_interpolation_local", None),
                rotary_base=base, use_cpu_initialization=config.use_cpu_initialization)

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, *args, **kwargs):
        precomputed = (rotary_pos_cos, rotary_pos_sin, kwargs.get("rotary_pos_cos_sin"))
        if self.local_rope is not None and any(t is not None for t in precomputed):
            raise NotImplementedError("Gemma3SelfAttention: precomputed rotary cos/sin (flash decode, flashinfer "
                                      "rope) are the global layers'; the sliding layers' own base is not applied there")
        if self.local_rope is not None and rotary_pos_emb is not None:
            emb = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            # the same positions GPTModel's rotary embedding covered, with this layer's base
            rotary_pos_emb = self.local_rope(emb.shape[0]).to(emb.device)
        return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                               rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, *args, **kwargs)


class PostNormRowParallelLinear(RowParallelLinear):
    """A row-parallel projection whose (TP-reduced) output goes through ``post_layernorm``: Gemma's
    post-attention / post-feed-forward norm, applied before the residual add."""

    def __init__(self, input_size, output_size, *, config, bias, **kwargs):
        if bias:
            raise NotImplementedError("PostNormRowParallelLinear: a bias would be added after the norm by "
                                      "bias-dropout-add, not before it; Gemma's projections have none")
        super().__init__(input_size, output_size, config=config, bias=bias, **kwargs)
        self.post_layernorm = TorchNorm(config, output_size, eps=config.layernorm_epsilon)

    def forward(self, x, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        return self.post_layernorm(out), bias


def layer_spec(block_spec, config):
    """The ``gemma3`` family's hook: Gemma's layer, attention and post-norm projections in place of
    the stock local-spec ones (a modified copy; ``block_spec`` is not changed)."""
    layers = [_gemma_layer(spec) for spec in block_spec.layer_specs]
    return dataclasses.replace(block_spec, layer_specs=layers)


def _gemma_layer(spec):
    sub = spec.submodules
    attn, mlp = sub.self_attention, sub.mlp
    for what, have, want in (("layer", spec.module, TransformerLayer), ("attention", attn.module, SelfAttention),
                             ("attention projection", attn.submodules.linear_proj, RowParallelLinear),
                             ("MLP output projection", mlp.submodules.linear_fc2, RowParallelLinear)):
        if not (isinstance(have, type) and issubclass(have, want)):
            raise NotImplementedError(
                f"gemma3 layer spec: the {what} is {getattr(have, '__name__', have)}, not the local spec's "
                f"{want.__name__}; only the local spec is built here (the Transformer Engine spec would need "
                "TENorm post-norms, untested without CUDA): use --spec local")
    attn = dataclasses.replace(attn, module=Gemma3SelfAttention, submodules=dataclasses.replace(
        attn.submodules, linear_proj=PostNormRowParallelLinear))
    mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, linear_fc2=PostNormRowParallelLinear))
    return dataclasses.replace(spec, module=Gemma3TransformerLayer,
                               submodules=dataclasses.replace(sub, self_attention=attn, mlp=mlp))
