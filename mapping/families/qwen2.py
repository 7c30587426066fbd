"""Qwen2 / Qwen2.5: GQA with q/k/v biases, SwiGLU MLP, RMSNorm; small sizes tie embeddings."""
from mapping.families import common as c
from mapping.family import Family

FAMILY = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    description="Qwen2 / Qwen2.5 (QKV bias)",
    read_config=lambda cfg: c.gqa_config("qwen2", cfg, qkv_bias=True),
    write_config=lambda m: c.gqa_hf_config(m, "Qwen2ForCausalLM", "qwen2"),
    rules=lambda m: [*c.embedding_rules(m.tie_embeddings), *c.gqa_attention_rules(qkv_bias=True),
                     *c.dense_mlp_rules()],
)
