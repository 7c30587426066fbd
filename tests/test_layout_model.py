"""``convert.layout_model``: the layout derived from a few-expert meta model equals the one a
meta model of the FULL config gives, so it cannot drift from Megatron-Core.

For every registered family (its tiny preset) and variants with more experts and layers, mixed
and uniform layer patterns and an MTP layer, in both specs (local, and te derived from local):
pieces (keys, global shapes, offsets, sizes, view shapes/strides/offsets, dtypes, parameter names,
in order), objects (keys and payload bytes, in order) and tensor shapes must be equal. The
published DeepSeek-V3-671B config is compared too (slow: the full model takes ~8 s to build).
"""
import json
from pathlib import Path

import pytest
import torch

from convert.formats.te_layout import te_layout
from convert.formats.torch_dist import TorchDistError
from convert.layout_model import _derive, model_layout, probe_experts
from mapping.layout import per_layer_keys
from mapping.registry import FAMILIES, family_for
from tools.tiny_configs import get_family, published_config

ROOT = Path(__file__).resolve().parents[1]
EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")  # HF names of the expert count


def _layers(cfg: dict, n: int) -> dict:
    """``cfg`` with ``n`` layers; per-layer lists (``layer_types``) continue their pattern."""
    out = {**cfg, "num_hidden_layers": n}
    if isinstance(cfg.get("layer_types"), list):
        out["layer_types"] = [cfg["layer_types"][i % len(cfg["layer_types"])] for i in range(n)]
    if cfg.get("max_window_layers") is not None:
        out["max_window_layers"] = min(cfg["max_window_layers"], n)
    return out


def _variants(family: str) -> dict[str, dict]:
    """name -> config.json for ``family``: the tiny preset, then more layers / experts, the layer
    patterns the family can express, MTP when it publishes it."""
    base = published_config(family)
    out = {"tiny": base, "6 layers": _layers(base, 6)}
    key = next((k for k in EXPERT_KEYS if k in base), None)
    if key is None or not base.get(key):
        return out
    out["32 experts, 6 layers"] = {**_layers(base, 6), key: 32}
    if "first_k_dense_replace" in base:
        out["uniform: all MoE"] = {**base, key: 16, "first_k_dense_replace": 0}
        out["mixed: 2 dense"] = {**_layers(base, 5), key: 16, "first_k_dense_replace": 2}
    if "mlp_only_layers" in base:
        out["mixed: mlp_only_layers"] = {**base, key: 16, "mlp_only_layers": [1]}
    if "decoder_sparse_step" in base:
        out["mixed: sparse step 2"] = {**base, key: 16, "decoder_sparse_step": 2}
    if get_family(family).has_mtp:
        out["mtp, 32 experts"] = {**published_config(family, mtp=True), key: 32}
    return out


def _cases():
    from tools.tiny_configs import FAMILIES as PRESETS

    return [(f, v) for f in FAMILIES if f in PRESETS for v in _variants(f)]


def _model(cfg: dict):
    return family_for(cfg).read_config(cfg)


def _assert_same(got, want, label: str) -> None:
    (gp, go, gs), (wp, wo, ws) = got, want
    assert list(gp) == list(wp), f"{label}: tensor names or their order differ"
    bad = [k for k in wp if gp[k] != wp[k]]
    assert not bad, f"{label}: pieces differ for {len(bad)} tensors, e.g. {bad[0]}: {gp[bad[0]]} vs {wp[bad[0]]}"
    assert [o.unique_key for o in go] == [o.unique_key for o in wo], f"{label}: object keys or order differ"
    assert [o.payload for o in go] == [o.payload for o in wo], f"{label}: object payloads differ"
    assert gs == ws, f"{label}: tensor shapes differ"


@pytest.mark.parametrize("family,variant", _cases(), ids=[f"{f}-{v}" for f, v in _cases()])
def test_derived_layout_equals_full_meta_model(family, variant):
    cfg = _variants(family)[variant]
    m = _model(cfg)
    if m.num_experts >= 16:  # with 8, a probe count may collide with every smaller size: built whole
        assert probe_experts(m) is not None, "the variant must exercise the derivation"
    if variant.startswith("mixed"):
        assert per_layer_keys(m.transformer)
    if variant.startswith("uniform"):
        assert not per_layer_keys(m.transformer)
    got = model_layout(m, torch.bfloat16)
    want = model_layout(m, torch.bfloat16, derive=False)
    _assert_same(got, want, f"{family} {variant} local")
    _assert_same(te_layout(*got, m), te_layout(*want, m), f"{family} {variant} te")


def test_variants_cover_every_family_and_pattern():
    cases = _cases()
    from tools.tiny_configs import FAMILIES as PRESETS

    assert {f for f, _ in cases} == set(FAMILIES) & set(PRESETS)
    moe = {f for f in FAMILIES if f in PRESETS and _model(published_config(f)).num_experts}
    assert {"uniform", "mixed", "mtp"} <= {v.split(":")[0].split(",")[0] for _, v in cases}
    assert len(moe) >= 4


@pytest.mark.slow
def test_derived_layout_equals_full_model_deepseek_v3_671b():
    cfg = json.loads((ROOT / "tools/configs/deepseek_v3_671b.json").read_text())
    m = _model(cfg)
    assert probe_experts(m) < m.num_experts == 256
    got, want = model_layout(m, torch.bfloat16), model_layout(m, torch.bfloat16, derive=False)
    _assert_same(got, want, "DeepSeek-V3-671B local")
    _assert_same(te_layout(*got, m), te_layout(*want, m), "DeepSeek-V3-671B te")


def test_a_layout_that_breaks_the_expert_rule_is_refused():
    """An expert whose piece differs from expert 0's other than along the expert axis."""
    import dataclasses

    from convert.layout_model import with_experts
    from convert.formats.torch_dist import layout_records
    from runtime import megatron as rt

    m = _model(published_config("qwen3_moe"))
    n = probe_experts(m)
    rt.init_local()
    model = rt.build_from(with_experts(m, n), dtype=torch.bfloat16, meta=True)
    pieces, objects, shapes = layout_records(model)
    lists = {name for name, mod in model.named_modules() if isinstance(mod, torch.nn.ModuleList) and len(mod) == n}
    name = next(k for k in pieces if ".local_experts.2." in k)
    pieces[name] = [dataclasses.replace(pieces[name][0], view_offset=7)] + pieces[name][1:]
    with pytest.raises(TorchDistError, match="differ from expert 0"):
        _derive(pieces, objects, shapes, lists, n, m.num_experts)
