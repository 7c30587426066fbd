"""Moonlight (Moonshot's 16B-A3B): the DeepSeek-V3 architecture with ``q_lora_rank: null``,
so queries use one ``q_proj`` (MCore ``linear_q_proj``) instead of the q down/up pair. Its
checkpoints name the architecture ``DeepseekV3ForCausalLM``; ``q_lora_rank`` tells them apart."""
import dataclasses

from mapping.families import deepseek_v3 as ds
from mapping.family import Family


def read_config(cfg):
    return dataclasses.replace(ds.read_config(cfg), family="moonlight")


FAMILY = Family(name="moonlight", architectures=("DeepseekV3ForCausalLM",),
                description="Moonlight (DeepSeek-V3 with q_lora_rank null)",
                read_config=read_config, rules=ds.rules, write_config=ds.write_config,
                matches=lambda cfg: cfg.get("q_lora_rank") is None)
