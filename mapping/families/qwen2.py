"""Qwen2 / Qwen2.5: GQA with q/k/v biases, SwiGLU MLP, RMSNorm; small sizes tie embeddings.

Qwen2 always has q/k/v biases (transformers ignores ``attention_bias`` for it) and reads an
optional ``head_dim`` (default hidden / heads). A sliding window is refused unless no layer uses it.
"""
from mapping.config_fields import must_be, read_fields
from mapping.families import common as c
from mapping.family import Family

FIELDS = {
    **c.gqa_fields("qwen2", "Qwen2ForCausalLM", "qwen2", kv_heads=32, head_dim=c.HEAD_DIM, max_positions=32768),
    **c.sliding_fields(per_layer=True),
    "use_mrope": must_be(False, "multimodal rope (Qwen2-VL) is not a Qwen2ForCausalLM; this model cannot be "
                         "converted as qwen2"),
}

FAMILY = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    description="Qwen2 / Qwen2.5, QKV bias", published=("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-7B"),
    read_config=lambda cfg: c.gqa_config(read_fields(FIELDS, "qwen2", cfg), qkv_bias=True),
    write_config=lambda m: c.gqa_hf_config(m, "Qwen2ForCausalLM", "qwen2", use_mrope=False,
                                           **c.sliding_off(m, per_layer=True)),
    rules=lambda m: [*c.embedding_rules(m.tie_embeddings), *c.gqa_attention_rules(qkv_bias=True),
                     *c.dense_mlp_rules()],
    fields=FIELDS,
)
