"""config.json -> ModelConfig -> config.json on the twelve published configs, full size and shrunk.

``write_config(read_config(cfg))`` must load with transformers' ``AutoConfig`` (no remote code: Kimi-K2
comes back as ``deepseek_v3``, its architecture's model type) and mean what ``cfg`` means on every
field the family owns: translated fields compared by meaning (``rope_theta``/``rope_scaling`` vs
transformers 5's ``rope_parameters``, ``num_experts`` vs ``num_local_experts``, absent vs default),
checked fields accepted. The same holds for what transformers makes of the written file
(``AutoConfig(...).to_dict()``) and of the published one (``transformers_config``), so our defaults
and spellings are transformers' too.
"""
import json
from pathlib import Path

import pytest
import torch

from convert.formats import transformers_config
from mapping.config_fields import Reader, by_kind, canon
from mapping.registry import family_for
from tools.shrink import shrink

PUBLISHED = Path(__file__).with_name("fixtures") / "published"
MODELS = sorted(p.name for p in PUBLISHED.iterdir() if p.is_dir())


def published(model: str, shrunk: bool) -> dict:
    cfg = json.loads((PUBLISHED / model / "config.json").read_text())
    return shrink(cfg) if shrunk else cfg


def meanings(family, cfg: dict) -> dict:
    """Every translated field's meaning in ``cfg`` (spellings and defaults resolved)."""
    get = Reader(family.fields, family.name, cfg)
    return {name: canon(get(name)) for name in by_kind(family.fields)["translated"]}


def loaded(cfg: dict, tmp_path: Path) -> dict:
    """What transformers reads from ``cfg`` written as config.json (AutoConfig, no remote code)."""
    from transformers import AutoConfig
    (tmp_path / "config.json").write_text(json.dumps(cfg, indent=2))
    return AutoConfig.from_pretrained(tmp_path).to_dict()


@pytest.mark.parametrize("shrunk", [False, True], ids=["full", "shrunk"])
@pytest.mark.parametrize("model", MODELS)
def test_written_config_loads_and_means_the_same(model, shrunk, tmp_path):
    cfg = published(model, shrunk)
    family = family_for(cfg)
    m = family.read_config(cfg)
    written = family.write_config(m)
    assert family_for(written) is family
    assert family.read_config(written) == m
    want = meanings(family, cfg)
    assert meanings(family, written) == want
    seen = loaded(written, tmp_path)
    assert family_for(seen) is family
    assert meanings(family, seen) == want
    assert family.read_config(seen) == m  # checked fields accepted, nothing unknown
    # transformers reads the published file the way read_config does (defaults, spellings)
    original = transformers_config(cfg, torch.bfloat16).to_dict()
    assert meanings(family, original) == want


@pytest.mark.parametrize("model", MODELS)
def test_written_config_carries_every_owned_published_field(model):
    """No owned field is left to a default: a translated or checked field the published config spells
    out is spelled out (maybe under another name) in the written one."""
    cfg = published(model, False)
    family = family_for(cfg)
    written = family.write_config(family.read_config(cfg))
    get = Reader(family.fields, family.name, written)
    kinds = by_kind(family.fields)
    dropped = [k for k in cfg if k not in kinds["irrelevant"] and k != "quantization_config"
               and not any(s in written for s in get.spellings(k))
               and not (family.fields[k].meaning and {"rope_theta", "rope_parameters"} & set(written))]
    assert dropped == []
