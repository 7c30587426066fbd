"""How a checkpoint lays its layers out: the one rule every family follows.

A ``torch_dist`` checkpoint stores a homogeneous decoder stack *stacked*: one key per module
(``decoder.layers.self_attention.linear_qkv.weight``) with the layer index folded into a leading
axis. A mixed stack (DeepSeek's first-k-dense, then MoE) keeps *per-layer* keys
(``decoder.layers.0.self_attention...``). Megatron-Core chooses between the two in
``TransformerBlock.sharded_state_dict`` from the model's config and the sharded-state-dict
metadata, so a checkpoint loads only into a model whose config makes the same choice.

What consumers build: Megatron-LM's ``pretrain_gpt.py`` and Megatron-Bridge describe an all-MoE
model (Qwen3-30B-A3B, Mixtral) with ``--moe-layer-freq 1`` (the default), a first-k-dense model
with the list ``[0]*k+[1]*(n-k)``, and pass ``singleton_local_shards=False``. So:

* ``moe_layer_freq`` writes a layer pattern the way those consumers do: the int 1 when every
  layer is MoE, the per-layer 0/1 list only when the pattern is mixed;
* ``CONTENT_METADATA`` is the metadata Megatron-LM's training loop passes to
  ``sharded_state_dict`` (``_build_sharded_state_dict_metadata``, without the process group); the
  converter lays its checkpoint out under it and records it in ``common.pt``;
* ``per_layer_keys`` restates Megatron-Core 0.16.1's decision; ``tests/test_layout_rule.py`` holds
  it against the installed Megatron-Core for every family and pattern, so an upgrade that moves
  the decision fails there first.

Without this module an all-MoE conversion writes per-layer keys that ``--moe-layer-freq 1``
consumers cannot load (missing-key error at ``--load``).
"""
from __future__ import annotations

from typing import Union

CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}

LayerFreq = Union[int, list]


def moe_layer_freq(moe_layers, num_layers: int) -> LayerFreq:
    """``moe_layer_freq`` as Megatron-LM users pass it: 1 if every layer is MoE, else the 0/1 list."""
    moe = set(moe_layers)
    if moe == set(range(num_layers)):
        return 1
    return [int(L in moe) for L in range(num_layers)]


def per_layer_keys(transformer: dict, metadata: dict | None = None) -> bool:
    """Whether Megatron-Core stores this config's decoder layers under per-layer keys.

    ``transformer`` holds ``TransformerConfig`` keyword arguments; ``metadata`` is the
    sharded-state-dict metadata (default: ``CONTENT_METADATA``)."""
    md = CONTENT_METADATA if metadata is None else metadata
    freq = transformer.get("moe_layer_freq", 1)
    linear = transformer.get("linear_attention_freq")
    return bool(md.get("non_homogeneous_layers") or md.get("singleton_local_shards")
                or transformer.get("hetereogenous_dist_checkpoint")
                or transformer.get("heterogeneous_block_specs")
                or isinstance(freq, list) or freq > 1
                or isinstance(linear, list) or (isinstance(linear, int) and linear > 1))
