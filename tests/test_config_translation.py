"""config.json <-> Megatron-Core: ``write_config`` inverts ``read_config`` for every family, and
transformers, loading the tiny weights under the written config.json instead of the original,
gives the same logits (so the written fields mean to transformers what MCore was told)."""
import json
import os

import pytest
import torch

from convert_helpers import FAMILIES, fixed_tokens, transformers_logits
from mapping.registry import family_for
from tools.make_tiny import cached_tiny

CASES = [(f, False) for f in FAMILIES] + [("deepseek_v3", True)]


def _model_config(cfg):
    return family_for(cfg).read_config(cfg)


@pytest.mark.parametrize("family,mtp", CASES)
def test_write_config_inverts_read_config(family, mtp):
    cfg = json.loads((cached_tiny(family, mtp=mtp) / "config.json").read_text())
    m = _model_config(cfg)
    written = family_for(cfg).write_config(m)
    assert family_for(written).name == family
    assert _model_config(written) == m


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_written_config_the_same(family, tmp_path):
    src = cached_tiny(family)
    cfg = json.loads((src / "config.json").read_text())
    written = family_for(cfg).write_config(_model_config(cfg))
    for f in src.iterdir():
        if f.name != "config.json":
            os.symlink(f, tmp_path / f.name)
    (tmp_path / "config.json").write_text(json.dumps(written))
    ids = fixed_tokens(cfg["vocab_size"])
    assert torch.equal(transformers_logits(tmp_path, ids), transformers_logits(src, ids))


def test_yarn_and_llama3_rope_round_trip():
    ds = json.loads((cached_tiny("deepseek_v3") / "config.json").read_text())
    ds["rope_scaling"] = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    llama = json.loads((cached_tiny("llama") / "config.json").read_text())
    llama["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for cfg in (ds, llama):
        m = _model_config(cfg)
        assert _model_config(family_for(cfg).write_config(m)) == m


def test_unexpressible_moe_layout_is_refused():
    import dataclasses

    from mapping.family import ConfigError

    cfg = json.loads((cached_tiny("deepseek_v3") / "config.json").read_text())
    m = _model_config(cfg)
    odd = dataclasses.replace(m, moe_layers=(1, 3))
    with pytest.raises(ConfigError, match="first k dense"):
        family_for(cfg).write_config(odd)
