"""Qwen3 dense: GQA with per-head q/k RMSNorm, no QKV bias, explicit head_dim."""
from mapping.families import common as c
from mapping.family import Family

FAMILY = Family(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    description="Qwen3 dense (q/k norm)",
    read_config=lambda cfg: c.gqa_config("qwen3", cfg, qk_norm=True),
    write_config=lambda m: c.gqa_hf_config(m, "Qwen3ForCausalLM", "qwen3", attention_bias=False),
    rules=lambda m: [*c.embedding_rules(m.tie_embeddings), *c.gqa_attention_rules(qk_norm=True),
                     *c.dense_mlp_rules()],
)
