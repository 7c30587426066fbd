"""Probe for ``mla_rope_key_grad_tp`` (run by ``runtime.patches.megatron_core`` under torchrun, 2 ranks):
one local-spec MLA layer at TP=2 in float64; the backward's directional derivative d loss/dx . d
against a central finite difference. Prints ``PROBE mla_rope_key_grad_tp DEFECT|FIXED ...`` on rank 0.
``PROBE_PATCHED=1`` applies the patch first (the test that it repairs)."""
import os
import sys

sys.modules["transformer_engine"] = None  # probe the no-TE case whatever is installed


def main() -> None:
    from runtime.megatron_import import import_megatron

    import_megatron()
    import torch
    import torch.distributed as dist

    from runtime import megatron as rt
    from runtime.modules import substitute_local_modules
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    torch.set_num_threads(1)
    rt.init_distributed(tp=2, seed=3)  # applies the setup patches: undo ours unless asked for
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    qkv = MLASelfAttention.get_query_key_value_tensors
    if not os.environ.get("PROBE_PATCHED") and getattr(qkv, "__patched__", False):
        MLASelfAttention.get_query_key_value_tensors = qkv.__wrapped__
    cfg = MLATransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=16,
                               qk_head_dim=8, qk_pos_emb_head_dim=8, v_head_dim=8, tensor_model_parallel_size=2,
                               use_cpu_initialization=True, params_dtype=torch.float64, rope_type="rope",
                               hidden_dropout=0.0, attention_dropout=0.0, multi_latent_attention=True)
    spec = substitute_local_modules(get_gpt_layer_local_spec(multi_latent_attention=True), cfg)
    attn = build_module(spec, config=cfg, layer_number=1).self_attention
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 32, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.randn(6, 1, 32, generator=g, dtype=torch.float64)
    mask = rt.causal_mask(6)

    def loss(inp):
        out, _ = attn(inp, mask)
        return (out.double() ** 2).sum()

    loss(x).backward()
    eps = 1e-5
    with torch.no_grad():
        numeric = float((loss(x + eps * d) - loss(x - eps * d)) / (2 * eps))
    analytic = float((x.grad * d).sum())
    if dist.get_rank() == 0:
        defect = abs(analytic - numeric) > 1e-5 * abs(numeric)  # float64: the difference is ~1e-10 relative
        print("PROBE mla_rope_key_grad_tp", "DEFECT" if defect else "FIXED",
              f"TP=2 local MLA: backward {analytic:.9g} vs finite difference {numeric:.9g}", flush=True)
    rt.destroy_distributed()


if __name__ == "__main__":
    main()
