"""Moonlight (Moonshot's 16B-A3B): the DeepSeek-V3 architecture with ``q_lora_rank: null``,
so queries use one ``q_proj`` (MCore ``linear_q_proj``) instead of the q down/up pair. Its
checkpoints name the architecture ``DeepseekV3ForCausalLM``; ``q_lora_rank`` tells them apart.
Its config.json fields are DeepSeek-V3's (``deepseek_v3.FIELDS``)."""
from mapping.families import deepseek_v3 as ds
from mapping.family import Family

FAMILY = Family(name="moonlight", architectures=(ds.ARCH,),
                description="Moonlight: DeepSeek-V3 with `q_lora_rank: null` (a single `q_proj`)", published=("moonshotai/Moonlight-16B-A3B",),
                read_config=lambda cfg: ds.read_config(cfg, family="moonlight"), rules=ds.rules,
                write_config=ds.write_config, matches=lambda cfg: cfg.get("q_lora_rank") is None,
                fields=ds.FIELDS)
