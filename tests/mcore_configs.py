"""Tiny Megatron-Core configs used by the runtime tests: a dense GQA model and a DeepSeek-V3
style MLA + MoE model (dense first layer, shared experts, sigmoid routing with expert bias,
group-limited routing)."""
from __future__ import annotations

import torch


def tiny_config(kind: str, tp: int = 1, ep: int = 1):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    common = dict(
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, hidden_size=128, num_attention_heads=4,
        ffn_hidden_size=256, tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    if kind == "dense":
        return TransformerConfig(num_layers=2, num_query_groups=2, add_qkv_bias=True,
                                 kv_channels=32, **common)
    if kind == "mla_moe":
        return MLATransformerConfig(
            num_layers=3, q_lora_rank=64, kv_lora_rank=512, qk_head_dim=32, qk_pos_emb_head_dim=64,
            v_head_dim=32, qk_layernorm=True, rope_type="rope", multi_latent_attention=True,
            num_moe_experts=4, moe_ffn_hidden_size=64, moe_shared_expert_intermediate_size=64,
            moe_router_topk=2, moe_layer_freq=[0, 1, 1], moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True, moe_router_pre_softmax=True,
            moe_router_num_groups=2, moe_router_group_topk=1,
            moe_router_topk_scaling_factor=2.5, moe_router_dtype="fp32",
            moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0,
            sequence_parallel=tp > 1, **common)
    raise ValueError(kind)


def batch(vocab: int = 512, b: int = 2, s: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    return ids, torch.arange(s)[None].expand(b, -1)
