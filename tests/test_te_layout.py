"""``--spec te`` checkpoints: the key set a TE-spec ``GPTModel.sharded_state_dict()`` asks for.

TE needs CUDA, so the expected keys are an explicit table: Megatron-Core's own local-spec layout
(a meta model, i.e. the installed megatron-core answers) plus the differences read by hand off
megatron-core 0.16.1's ``get_gpt_layer_with_transformer_engine_spec`` and TE 2.8 (which modules
are TE modules with ``_extra_state``, which norms TE fuses). The table is written out below, not
computed by ``convert/te_layout.py``. The written checkpoint is then read by Megatron-Core's own
loader into an independently built model, and converted back bitwise.
"""
import json
import pickle
from pathlib import Path

import pytest
import torch

from convert import hf2mcore, mcore2hf
from runtime import megatron as rt
from convert.formats import checkpoint_dir
from convert.conversion_plan import build_plan
from convert_helpers import fixed_tokens, hf_tensors, mcore_logits, transformers_logits
from tools.make_tiny import cached_tiny

FINAL = "decoder.final_layernorm._extra_state/shard_0_1"


def _per_layer(layers, names, homogeneous_of=None):
    """Object keys of ``names`` (module paths in a layer) for ``layers``."""
    if homogeneous_of:
        return {f"decoder.layers.{n}._extra_state/shard_{l}_{homogeneous_of}" for l in layers for n in names}
    return {f"decoder.layers.{l}.{n}._extra_state/shard_0_1" for l in layers for n in names}


def _mla_renames(layers, dense, prefix="decoder.layers.{l}."):
    out = {}
    for l in layers:
        p = prefix.format(l=l)
        out[p + "self_attention.q_layernorm.weight"] = p + "self_attention.linear_q_up_proj.layer_norm_weight"
        out[p + "self_attention.kv_layernorm.weight"] = p + "self_attention.linear_kv_up_proj.layer_norm_weight"
        if l in dense:
            out[p + "pre_mlp_layernorm.weight"] = p + "mlp.linear_fc1.layer_norm_weight"
    return out


MTP = "mtp.layers.0."
# family -> (local storage key -> TE storage key, TE objects the local spec lacks). Tiny configs:
# 4 layers each; qwen3 and qwen3_moe are homogeneous (stacked keys), the DeepSeek families store
# layers separately (dense first layer, then MoE);
# DeepSeek-V3's layer 0 is dense (first_k_dense_replace=1); Moonlight has no q_lora (no q norm).
TE_DELTA = {
    "llama": ({}, {FINAL}),
    "qwen2": ({}, {FINAL}),
    "qwen3": ({}, {FINAL} | _per_layer(range(4), ["self_attention.q_layernorm", "self_attention.k_layernorm"], 4)),
    "qwen3_moe": (  # every layer MoE: stacked, like qwen3
        {"decoder.layers.mlp.linear_fc1.layer_norm_weight": "decoder.layers.pre_mlp_layernorm.weight"},
        {FINAL} | _per_layer(range(4), ["pre_mlp_layernorm", "self_attention.q_layernorm",
                                        "self_attention.k_layernorm"], 4)),
    "deepseek_v3": (
        _mla_renames(range(4), dense={0}),
        {FINAL} | _per_layer(range(4), ["input_layernorm"]) | _per_layer(range(1, 4), ["pre_mlp_layernorm"])),
    "moonlight": (
        {k: v for k, v in _mla_renames(range(4), dense={0}).items() if "q_layernorm" not in k},
        {FINAL} | _per_layer(range(4), ["input_layernorm"]) | _per_layer(range(1, 4), ["pre_mlp_layernorm"])),
    "deepseek_v3+mtp": (
        _mla_renames(range(4), dense={0}) | _mla_renames([0], dense=set(), prefix=MTP + "transformer_layer."),
        {FINAL} | _per_layer(range(4), ["input_layernorm"]) | _per_layer(range(1, 4), ["pre_mlp_layernorm"])
        | {f"{MTP}{n}._extra_state/shard_0_1" for n in ("enorm", "hnorm", "final_layernorm",
                                                        "transformer_layer.input_layernorm",
                                                        "transformer_layer.pre_mlp_layernorm")}),
}


def _config(case):
    family, _, mtp = case.partition("+")
    return json.loads((cached_tiny(family, mtp=bool(mtp)) / "config.json").read_text())


def _keys(plan):
    tensors = {p.key: p.global_shape for ps in plan.pieces.values() for p in ps}
    return tensors, {o.unique_key for o in plan.objects}


@pytest.mark.parametrize("case", list(TE_DELTA))
def test_te_keys_match_the_table(case):
    cfg = _config(case)
    local_t, local_o = _keys(build_plan(cfg, torch.float32, "local"))
    te_t, te_o = _keys(build_plan(cfg, torch.float32, "te"))
    renames, added = TE_DELTA[case]
    assert set(renames) <= set(local_t), case
    want_t = {renames.get(k, k): shape for k, shape in local_t.items()}
    assert te_t == want_t, case
    assert te_o == local_o | added, case


def _metadata(root) -> dict:
    with open(checkpoint_dir(root) / ".metadata", "rb") as f:
        return pickle.load(f).state_dict_metadata


@pytest.fixture(scope="module")
def te_converted(tmp_path_factory):
    out = {}
    for family in ("qwen3_moe", "deepseek_v3"):
        hf = cached_tiny(family)
        root = tmp_path_factory.mktemp(f"te-{family}") / "mcore"
        hf2mcore.run(str(hf), str(root), spec="te")
        out[family] = (hf, root)
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_written_checkpoint_has_exactly_the_te_keys(te_converted, family):
    _, root = te_converted[family]
    local_t, local_o = _keys(build_plan(_config(family), torch.float32, "local"))
    renames, added = TE_DELTA[family]
    want = {renames.get(k, k) for k in local_t} | local_o | added
    assert set(_metadata(root)) == want


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_mcore_loader_reads_te_checkpoint(te_converted, family):
    """Megatron-Core's own ``dist_checkpointing.load``: every ``_extra_state`` comes back as the
    empty uint8 tensor TE's ``set_extra_state`` skips, and a local-spec model whose norm keys are
    renamed by the table above reproduces transformers' logits."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from mapping.registry import family_for

    hf, root = te_converted[family]
    ckpt = str(checkpoint_dir(root))
    renames, added = TE_DELTA[family]
    rt.init_local()
    objects = {}
    for key in added:
        name, shard = key.split("/shard_")
        offset, shape = (tuple(int(x) for x in s.split(".")) for s in shard.split("_"))
        objects[key] = ShardedObject(name, None, shape, offset, replica_id=0)
    for key, value in dist_checkpointing.load({"objects": objects}, ckpt)["objects"].items():
        assert isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.numel() == 0, key

    cfg = json.loads(Path(hf, "config.json").read_text())
    m = family_for(cfg).read_config(cfg)
    model = rt.build_from(m, dtype=torch.float32)
    sharded = model.sharded_state_dict()
    for sh in sharded.values():
        if isinstance(sh, ShardedTensor) and sh.key in renames:
            sh.key = renames[sh.key]
    model.load_state_dict(rt.load_checkpoint(model, ckpt, sharded))
    ids = fixed_tokens(m.vocab_size)
    got, want = mcore_logits(model.eval(), m, ids), transformers_logits(hf, ids)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_te_checkpoint_round_trips_bitwise(te_converted, family, tmp_path):
    hf, root = te_converted[family]
    res = mcore2hf.run(str(root), str(tmp_path / "hf"))
    assert res["spec"] == "te"
    a, b = hf_tensors(hf), hf_tensors(tmp_path / "hf")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not rt.has_te(), reason="needs Transformer Engine (CUDA)")
@pytest.mark.parametrize("case", list(TE_DELTA))
def test_derived_layout_equals_a_real_te_model(case):
    from convert.formats import layout
    from mapping.registry import family_for

    cfg = _config(case)
    m = family_for(cfg).read_config(cfg)
    pieces, objects, _ = layout(rt.build_from(m, spec="te", meta=True))
    te_t, te_o = _keys(build_plan(cfg, torch.float32, "te"))
    assert {p.key: p.global_shape for ps in pieces.values() for p in ps} == te_t
    assert {o.unique_key for o in objects} == te_o


def test_validate_refuses_te_checkpoint_with_one_line(te_converted):
    from convert import validate

    hf, root = te_converted["qwen3_moe"]
    with pytest.raises(validate.ValidateError, match="--spec te checkpoint.*--spec local"):
        validate.run(str(hf), str(root), progress=False)
