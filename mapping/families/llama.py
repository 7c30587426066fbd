"""Llama 3 / 3.1 / 3.2: GQA, SwiGLU, RMSNorm, llama3 rope scaling; 3.2 1B/3B tie embeddings."""
from mapping.families import common as c
from mapping.family import Family

FAMILY = Family(
    name="llama",
    architectures=("LlamaForCausalLM",),
    description="Llama 3.x (tied embeddings in 3.2 1B/3B)",
    read_config=lambda cfg: c.gqa_config("llama", cfg, qkv_bias=bool(cfg.get("attention_bias"))),
    write_config=lambda m: c.gqa_hf_config(m, "LlamaForCausalLM", "llama", mlp_bias=False,
                                           attention_bias=m.transformer["add_qkv_bias"]),
    rules=lambda m: [*c.embedding_rules(m.tie_embeddings),
                     *c.gqa_attention_rules(qkv_bias=m.transformer["add_qkv_bias"]),
                     *c.dense_mlp_rules()],
)
