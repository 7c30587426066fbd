"""A toy model family, whole in one file: the worked example of README's "Adding a model family".

``ToyFusedMoeForCausalLM`` is Qwen3-MoE stored the way gpt-oss stores experts: one tensor per
layer stacks all experts, ``mlp.experts.gate_up_proj`` of shape [E, H, 2I] with gate and up
interleaved along the last axis, and ``mlp.experts.down_proj`` of shape [E, I, H]. A family file in
``mapping/families/`` is found by the registry on its own; this one lives with the tests, so
``install()`` registers it (and its transforms) and returns the undo. Nothing else in the project
changes. It uses the three extension points a new family may need:

1. its own tensor transforms, registered by name (``register_op``);
2. experts stacked in one HF tensor: the HF pattern ends in ``[{E}]`` (``EXPERT_SLICE``), so each
   MCore expert tensor is made from its slice along dim 0;
3. a hook on Megatron-Core's layer spec (``Family.layer_spec``): here it swaps the core attention
   for a subclass that counts its calls, so a test can see every model builder applied it.

Shape legend: E experts, H hidden, I expert FFN width.
"""
from __future__ import annotations

import dataclasses

import torch

from mapping.families import common as c
from mapping.families import qwen3_moe
from mapping.family import Family
from mapping.registry import FAMILIES, register
from mapping.rules import EXPERT_SLICE, OPS, Op, Rule, register_op

NAME, ARCH = "toy_fused_moe", "ToyFusedMoeForCausalLM"


# 1. transforms: pure functions on one expert's slice (HF) <-> one MCore expert tensor
def _gate_up_to_mcore(ts, shapes):
    (x_H2I,) = ts  # gate and up interleaved: columns 0, 2, 4, ... are gate, 1, 3, 5, ... are up
    return torch.cat([x_H2I[:, 0::2].t(), x_H2I[:, 1::2].t()], dim=0).contiguous()  # [2I, H]: [gate; up]


def _gate_up_to_hf(t_2IH, shapes):
    gate_IH, up_IH = t_2IH.chunk(2, dim=0)
    return [torch.stack([gate_IH.t(), up_IH.t()], dim=-1).reshape(gate_IH.shape[1], -1).contiguous()]


_transpose = Op(lambda ts, s: ts[0].t().contiguous(), lambda t, s: [t.t().contiguous()])
# At run time TP rank r holds [gate_r; up_r], as for the stock gate_up transform: reuse its merge.
_gate_up = Op(_gate_up_to_mcore, _gate_up_to_hf, merge_tp=OPS["gate_up"].merge_tp)


# 3. the layer-spec hook
class CountingCoreAttention:
    """Mixed into the core attention class the spec already uses; counts forward calls."""
    calls = 0

    def forward(self, *args, **kwargs):
        CountingCoreAttention.calls += 1
        return super().forward(*args, **kwargs)


def _count_attention(block_spec, config):
    for layer in block_spec.layer_specs:
        attn = layer.submodules.self_attention.submodules
        base = attn.core_attention
        attn.core_attention = type(f"Counting{base.__name__}", (CountingCoreAttention, base), {})
    return block_spec


# the family: Qwen3-MoE's config translation, its rules with the experts from stacked tensors
def read_config(cfg: dict):
    m = qwen3_moe.read_config(dict(cfg, architectures=["Qwen3MoeForCausalLM"]))
    return dataclasses.replace(m, family=NAME)


def write_config(m) -> dict:
    return dict(qwen3_moe.write_config(dataclasses.replace(m, family="qwen3_moe")), architectures=[ARCH])


def rules(m):
    experts = c.MC + "mlp.experts.local_experts.{E}."
    stacked = [Rule(experts + "linear_fc1.weight", c.HF + "mlp.experts.gate_up_proj" + EXPERT_SLICE,
                    op="toy_gate_up", tp="column", expert=True, layers=m.moe_layers),
               Rule(experts + "linear_fc2.weight", c.HF + "mlp.experts.down_proj" + EXPERT_SLICE,
                    op="toy_transpose", tp="row", expert=True, layers=m.moe_layers)]
    return [r for r in qwen3_moe.rules(m) if ".local_experts." not in r.mcore] + stacked


FAMILY = Family(name=NAME, architectures=(ARCH,), read_config=read_config, rules=rules,
                write_config=write_config, description="Qwen3-MoE with gpt-oss-style stacked experts (a test)",
                fields=qwen3_moe.FIELDS, layer_spec=_count_attention)


def install():
    """Register the toy family and its transforms; returns the function that removes them."""
    register_op("toy_transpose", _transpose)
    register_op("toy_gate_up", _gate_up)
    register(FAMILY)

    def uninstall():
        FAMILIES.pop(NAME, None)
        OPS.pop("toy_transpose", None)
        OPS.pop("toy_gate_up", None)
    return uninstall
