"""LoRA sites from a family's rules: which Megatron-Core linear gets which adapters, named in Hugging
Face / PEFT terms. Pure data (no process groups, no modules): rl.lora builds the adapters, the sync and
the export name them with it.

A user names targets as PEFT does, by the HF linear's last name component (``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``; MLA's ``q_a_proj``, ``q_b_proj``,
``kv_a_proj_with_mqa``, ``kv_b_proj``, ...), plus ``experts`` for every routed expert's linears (per
expert adapters, as PEFT names them). Each target resolves through the family's rules to the MCore
linear that holds that HF weight: a rule fusing several HF linears (``qkv``, ``gate_up``) is one MCore
linear with one adapter per targeted part, and the part's output rows land where the rule's own
transform puts that part's weight rows; parts not targeted get no adapter (their rows get 0).

    sites = lora_sites(family, m, ("q_proj", "v_proj", "down_proj"))
    sites[0].module == "decoder.layers.0.self_attention.linear_qkv"
    sites[0].parts == ("model.layers.0.self_attn.q_proj", ..k_proj, ..v_proj); .targeted == (True, False, True)
    peft_key(sites[0].parts[0], "A") == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

Errors (one line, ``LoRAError``): a target no linear of the family has (the message lists the ones it
has), a rank or alpha <= 0, an empty target list.
"""
from __future__ import annotations

from dataclasses import dataclass

from mapping.entries import Entry, expand

LINEAR_OPS = ("copy", "qkv", "gate_up")  # transforms that stack HF linears along the output rows
EXPERTS = "experts"


class LoRAError(ValueError):
    """A LoRA setting the family cannot honour; the message names it and what to use instead."""


@dataclass(frozen=True)
class Site:
    """One MCore linear with adapters."""
    entry: Entry
    """the base weight's plan entry (TP=PP=EP=1 MCore name, HF names, rule)"""
    targeted: tuple[bool, ...]
    """per HF part (the rule's order): does it get an adapter"""

    @property
    def module(self) -> str:
        return self.entry.mcore[: -len(".weight")]

    @property
    def parts(self) -> tuple[str, ...]:
        """HF module names of the parts (weights without ``.weight``)."""
        return tuple(h[: -len(".weight")] for h in self.entry.hf)

    @property
    def expert(self) -> bool:
        return self.entry.rule.expert


def peft_key(part: str, which: str) -> str:
    """PEFT's tensor name for an HF module's A or B matrix."""
    return f"base_model.model.{part}.lora_{which}.weight"


def _linear_rules(rules) -> list:
    return [r for r in rules if r.op in LINEAR_OPS and r.tp in ("column", "row") and r.mcore.endswith(".weight")
            and all(h.endswith(".weight") for h in r.hf)]


def linear_names(rules) -> list[str]:
    """The target names a family offers: its dense linears' last name component, and ``experts``."""
    names = {h[: -len(".weight")].rsplit(".", 1)[-1] for r in _linear_rules(rules) if not r.expert for h in r.hf}
    return sorted(names) + ([EXPERTS] if any(r.expert for r in _linear_rules(rules)) else [])


def check(targets, rank: int, alpha: float, family) -> None:
    if rank <= 0 or alpha <= 0:
        raise LoRAError(f"model.lora: rank={rank}, alpha={alpha}; both must be > 0 (e.g. rank 8, alpha 16)")
    if not targets:
        raise LoRAError("model.lora.targets is empty; name HF linears such as [q_proj, k_proj, v_proj, o_proj]")


def lora_sites(family, m, targets) -> list[Site]:
    """Every MCore linear of model `m` (a family ModelConfig) with at least one targeted part."""
    rules = family.rules(m)
    offered = linear_names(rules)
    unknown = sorted(set(targets) - set(offered))
    if unknown:
        raise LoRAError(f"model.lora.targets {unknown}: {family.name} has no such linear; choose from {offered}")
    sites = []
    for e in expand(_linear_rules(rules), m):
        names = [h[: -len(".weight")].rsplit(".", 1)[-1] for h in e.hf]
        hit = tuple((EXPERTS in targets) if e.rule.expert else (n in targets) for n in names)
        if any(hit):
            sites.append(Site(e, hit))
    return sites


def targeted_parts(sites) -> list[str]:
    """The HF module names that carry adapters, in site order."""
    return [p for s in sites for p, hit in zip(s.parts, s.targeted) if hit]


def peft_config(sites, rank: int, alpha: float, dropout: float, base: str = "") -> dict:
    """adapter_config.json for PEFT's LoraConfig (and vLLM's PEFTHelper). target_modules lists the exact
    HF module names (PEFT matches by suffix, so a bare ``gate_proj`` would also claim every expert's)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
            "target_modules": targeted_parts(sites), "bias": "none", "base_model_name_or_path": base,
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True}
