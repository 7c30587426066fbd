"""Mistral (MistralForCausalLM; Mistral-7B v0.2/v0.3, Ministral-style dense models): Llama's layer
(GQA, SwiGLU, RMSNorm, no biases) with an explicit ``head_dim`` and a ``sliding_window`` that, when
set, applies to every layer.

Megatron-Core 0.16.1 expresses a window (``window_size=(W-1, 0)``: transformers' window W counts
the token itself), but the CPU local spec here has no windowed kernel and nothing here could check
one against transformers, so a window shorter than the context is refused; ``sliding_window: null``
(v0.2 and later) or a window covering ``max_position_embeddings`` is full attention.
"""
from mapping.config_fields import checked, read_fields
from mapping.families import common as c
from mapping.family import Family

ARCH = "MistralForCausalLM"

FIELDS = {
    **c.gqa_fields("mistral", ARCH, "mistral", kv_heads=8, head_dim=c.HEAD_DIM, max_positions=4096 * 32),
    "sliding_window": checked(
        4096, lambda w, get: w is None or w >= get("max_position_embeddings"),
        lambda get: f"full attention only (null, or a window >= max_position_embeddings="
                    f"{get('max_position_embeddings')})",
        "Megatron-Core's local attention here has no sliding window: convert a model trained with full "
        "attention (Mistral-7B v0.2+ publish sliding_window null)"),
}

FAMILY = Family(
    name="mistral", architectures=(ARCH,),
    description="Mistral 7B v0.2/v0.3: Llama's layer, explicit head_dim; a sliding window shorter than the "
                "context is refused",
    published=("mistralai/Mistral-7B-v0.3",),
    read_config=lambda cfg: c.gqa_config(read_fields(FIELDS, "mistral", cfg)),
    write_config=lambda m: c.gqa_hf_config(m, ARCH, "mistral", sliding_window=None),
    rules=lambda m: [*c.embedding_rules(m.tie_embeddings), *c.gqa_attention_rules(), *c.dense_mlp_rules()],
    fields=FIELDS,
)
