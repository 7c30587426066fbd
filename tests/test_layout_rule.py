"""``mapping.layout``: the stacked / per-layer rule, held against the installed Megatron-Core.

For every family and for uniform and mixed layer patterns, a meta-device ``GPTModel`` is built
from the family's translated config and asked for its ``sharded_state_dict`` keys; whether they
carry a layer index must be what ``per_layer_keys`` says. An upgrade of Megatron-Core that moves
the decision fails here before any checkpoint is written with the wrong layout.
"""
import json
import re

import pytest
import torch

from runtime import megatron as rt
from convert_helpers import FAMILIES
from mapping.layout import CONTENT_METADATA, moe_layer_freq, per_layer_keys
from mapping.registry import family_for
from tools.make_tiny import cached_tiny

PER_LAYER_KEY = re.compile(r"^decoder\.layers\.\d+\.")

# family -> config.json overrides giving a uniform or a mixed pattern (4 layers in the tiny configs)
PATTERNS = [(f, {}) for f in FAMILIES] + [
    ("qwen3_moe", {"mlp_only_layers": [1]}),          # mixed: one dense layer
    ("qwen3_moe", {"decoder_sparse_step": 2}),        # mixed: every second layer MoE
    ("deepseek_v3", {"first_k_dense_replace": 0}),    # uniform: all MoE
    ("deepseek_v3", {"first_k_dense_replace": 2}),    # mixed
]


def _keys(model, metadata) -> set[str]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sd = model.sharded_state_dict(metadata=dict(metadata))
    return {v.key for v in sd.values() if isinstance(v, ShardedTensor)}


@pytest.mark.parametrize("family,overrides", PATTERNS, ids=[f"{f}-{json.dumps(o)}" for f, o in PATTERNS])
@pytest.mark.parametrize("metadata", [CONTENT_METADATA, dict(CONTENT_METADATA, singleton_local_shards=True)],
                         ids=["megatron-lm", "singleton"])
def test_rule_matches_installed_megatron_core(family, overrides, metadata):
    cfg = dict(json.loads((cached_tiny(family) / "config.json").read_text()), **overrides)
    m = family_for(cfg).read_config(cfg)
    rt.init_local()
    keys = _keys(rt.build_from(m, meta=True), metadata)
    mcore_per_layer = any(PER_LAYER_KEY.match(k) for k in keys)
    assert per_layer_keys(m.transformer, metadata) == mcore_per_layer, sorted(keys)[:5]


@pytest.mark.parametrize("family,overrides,stacked", [
    ("qwen3_moe", {}, True), ("qwen3", {}, True), ("deepseek_v3", {"first_k_dense_replace": 0}, True),
    ("qwen3_moe", {"mlp_only_layers": [0]}, False), ("deepseek_v3", {}, False)])
def test_homogeneous_stacks_are_stacked(family, overrides, stacked):
    """The user-facing promise: all-MoE and all-dense stacks stacked, mixed ones per layer."""
    cfg = dict(json.loads((cached_tiny(family) / "config.json").read_text()), **overrides)
    assert per_layer_keys(family_for(cfg).read_config(cfg).transformer) is not stacked


def test_moe_layer_freq_is_what_megatron_lm_users_pass():
    assert moe_layer_freq(range(48), 48) == 1                      # Qwen3-30B-A3B: --moe-layer-freq 1
    assert moe_layer_freq(range(3, 61), 61) == [0] * 3 + [1] * 58  # DeepSeek-V3: [0]*3+[1]*58
    assert moe_layer_freq([1, 3], 4) == [0, 1, 0, 1]
    assert moe_layer_freq([], 2) == [0, 0]


def test_mcore_reads_moe_layer_freq_as_the_rule_assumes():
    """MCore turns the int 1 into 'every layer MoE' (not 'none'): the rule's premise."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = json.loads((cached_tiny("qwen3_moe") / "config.json").read_text())
    m = family_for(cfg).read_config(cfg)
    rt.init_local()
    model = rt.build_from(m, meta=True, dtype=torch.float32)
    assert m.transformer["moe_layer_freq"] == 1
    assert all(type(layer.mlp).__name__ == "MoELayer" for layer in model.decoder.layers)
    assert TransformerConfig.__dataclass_fields__["moe_layer_freq"].default == 1
