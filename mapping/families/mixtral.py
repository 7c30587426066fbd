"""Mixtral (MixtralForCausalLM; Mixtral-8x7B, 8x22B): Mistral's attention, every layer a sparse MoE
block of ``num_local_experts`` SwiGLU experts with a softmax top-k router, no shared expert.

Published names: ``block_sparse_moe.gate`` (router) and ``block_sparse_moe.experts.E.w1/w3/w2``
(gate, up, down). Routing: transformers takes the softmax over all experts, the top-k, then
renormalises them; Megatron-Core's top-k-then-softmax (``moe_router_pre_softmax=False``) is the same
function. ``router_jitter_noise`` only perturbs training. Every layer is MoE, so the checkpoint is
stacked, as ``--moe-layer-freq 1`` consumers load it.
"""
import dataclasses

from mapping.config_fields import irrelevant, read_fields, translated
from mapping.families import common as c
from mapping.families import mistral
from mapping.family import Family
from mapping.rules import Rule

ARCH = "MixtralForCausalLM"
MOE = c.HF + "block_sparse_moe."

FIELDS = {
    **c.gqa_fields("mixtral", ARCH, "mixtral", kv_heads=8, head_dim=c.HEAD_DIM, max_positions=4096 * 32),
    "sliding_window": dataclasses.replace(mistral.FIELDS["sliding_window"], default=None),  # Mixtral's default
    "rms_norm_eps": translated(1e-5),  # MixtralConfig's default (the shared one is 1e-6)
    "num_local_experts": translated(8),
    "num_experts_per_tok": translated(2),
    **irrelevant("output_router_logits", "router_aux_loss_coef", "router_jitter_noise"),  # training only
}


def read_config(cfg: dict):
    get = read_fields(FIELDS, "mixtral", cfg)
    moe, n = c.softmax_moe(get), get("num_hidden_layers")
    return c.gqa_config(get, moe=moe, moe_layers=tuple(range(n)))


def rules(m):
    experts = c.MC + "mlp.experts.local_experts.{E}."
    hf = MOE + "experts.{E}."
    return [*c.embedding_rules(m.tie_embeddings), *c.gqa_attention_rules(),
            Rule(c.MC + "pre_mlp_layernorm.weight", c.HF + "post_attention_layernorm.weight"),
            Rule(c.MC + "mlp.router.weight", MOE + "gate.weight"),
            Rule(experts + "linear_fc1.weight", (hf + "w1.weight", hf + "w3.weight"), op="gate_up", tp="column",
                 expert=True),
            Rule(experts + "linear_fc2.weight", hf + "w2.weight", tp="row", expert=True)]


def write_config(m) -> dict:
    t = m.transformer
    return c.gqa_hf_config(m, ARCH, "mixtral", sliding_window=None, num_local_experts=t["num_moe_experts"],
                           num_experts_per_tok=t["moe_router_topk"])


FAMILY = Family(name="mixtral", architectures=(ARCH,),
                description="Mixtral 8x7B/8x22B: every layer MoE, softmax top-2 router, experts w1/w3/w2",
                published=("mistralai/Mixtral-8x7B-v0.1",),
                read_config=read_config, rules=rules, write_config=write_config, fields=FIELDS)
