"""Qwen3 dense: GQA with per-head q/k RMSNorm, no QKV bias, explicit head_dim (default 128)."""
from mapping.config_fields import read_fields
from mapping.families import common as c
from mapping.family import Family

FIELDS = {
    **c.gqa_fields("qwen3", "Qwen3ForCausalLM", "qwen3", kv_heads=32, head_dim=128, max_positions=32768),
    **c.sliding_fields(per_layer=True),
    "attention_bias": c.no_bias("qwen3", "q/k/v/o_proj biases"),
}

FAMILY = Family(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    description="Qwen3 dense, q/k norm", published=("Qwen/Qwen3-0.6B", "Qwen/Qwen3-8B"),
    read_config=lambda cfg: c.gqa_config(read_fields(FIELDS, "qwen3", cfg), qk_norm=True),
    write_config=lambda m: c.gqa_hf_config(m, "Qwen3ForCausalLM", "qwen3", attention_bias=False,
                                           **c.sliding_off(m, per_layer=True)),
    rules=lambda m: [*c.embedding_rules(m.tie_embeddings), *c.gqa_attention_rules(qk_norm=True),
                     *c.dense_mlp_rules()],
    fields=FIELDS,
)
