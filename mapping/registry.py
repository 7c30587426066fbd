"""The family registry: which family file handles a given config.json."""
from __future__ import annotations

from mapping.family import ConfigError, Family
from mapping.families import deepseek_v3, llama, moonlight, qwen2, qwen3, qwen3_moe

FAMILIES: dict[str, Family] = {f.name: f for f in (
    llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, qwen3_moe.FAMILY, deepseek_v3.FAMILY, moonlight.FAMILY)}


def register(family: Family) -> None:
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    FAMILIES[family.name] = family


def family_for(hf_config: dict, source: str = "config.json") -> Family:
    """The family whose architecture (and ``matches``) fit ``hf_config``; a clear error otherwise."""
    archs = hf_config.get("architectures") or []
    found = [f for f in FAMILIES.values() if set(archs) & set(f.architectures) and f.matches(hf_config)]
    if len(found) == 1:
        return found[0]
    supported = sorted({a for f in FAMILIES.values() for a in f.architectures})
    if not found:
        raise ConfigError(f"{source}: unknown architecture {archs or '(none)'}; supported: "
                         f"{', '.join(supported)}. Add a family file under mapping/families/.")
    raise ConfigError(f"{source}: architecture {archs} matches several families "
                     f"{[f.name for f in found]}; make their `matches` predicates exclusive")
