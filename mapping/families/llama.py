"""Llama 3 / 3.1 / 3.2: GQA, SwiGLU, RMSNorm, llama3 rope scaling; 3.2 1B/3B tie embeddings."""
from mapping.config_fields import must_be, read_fields
from mapping.families import common as c
from mapping.family import Family

FIELDS = {
    **c.gqa_fields("llama", "LlamaForCausalLM", "llama", kv_heads=c.HEADS, head_dim=c.HEAD_DIM,
                   max_positions=2048),
    "attention_bias": c.no_bias("llama", "q/k/v/o_proj biases (attention_bias adds all four)"),
    "mlp_bias": c.no_bias("llama", "gate/up/down_proj biases"),
    "pretraining_tp": must_be(1, "set it to 1: it only chose a sliced matmul in transformers 4 (same weights); "
                              "other values are not verified here"),
}

FAMILY = Family(
    name="llama",
    architectures=("LlamaForCausalLM",),
    description="Llama 3.x; tied embeddings (3.2 1B/3B); llama3 rope scaling", published=("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.2-1B"),
    read_config=lambda cfg: c.gqa_config(read_fields(FIELDS, "llama", cfg)),
    write_config=lambda m: c.gqa_hf_config(m, "LlamaForCausalLM", "llama", attention_bias=False, mlp_bias=False,
                                           pretraining_tp=1),
    rules=lambda m: [*c.embedding_rules(m.tie_embeddings), *c.gqa_attention_rules(), *c.dense_mlp_rules()],
    fields=FIELDS,
)
