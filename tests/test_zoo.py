"""The zoo: twelve published model shapes, converted and loaded the way users load them.

Truth here is nothing this project wrote: the published config.json of each model
(``tests/fixtures/published/<Model>/config.json``), the Megatron-LM flags users run it with
(``megatron_lm_args.txt`` there, from Megatron-LM's own example confs), a ``GPTModel`` built from
those flags the way ``pretrain_gpt.py`` builds it (``runtime.megatron_lm``, no ``mapping/``), plain
``dist_checkpointing.load`` (strict), and transformers' forward.

Per model: the config is shrunk by ``tools.shrink`` (sizes only), weights are fabricated for it
(FP8 and MTP as published), ``hf2mcore`` converts it, and then:
- the Megatron-LM consumer loads it at TP=1 (in process), TP=2 and EP=2 (torchrun) and its logits
  match transformers' within 1e-4 x max|logit| in fp32;
- the flags hf2mcore writes beside the checkpoint build a model that loads it too;
- HF -> MCore -> HF is bitwise (FP8 inputs: their dequantised values);
- ``--dry-run`` plans the full-size published config on 8 and 64 ranks (slow).

DeepSeek-R1 is zooed as users most often meet it: a bf16 copy saved by transformers, which
declares its MTP layer (``num_nextn_predict_layers: 1``) and stores none of it; DeepSeek-V3 as
published (FP8, MTP stored).

Family-built models (a ``consumer.txt`` in the fixture folder instead of ``megatron_lm_args.txt``;
Gemma 3): Megatron-LM's ``pretrain_gpt.py`` cannot express them (the family's ``megatron_lm_gap``
says what is missing), so the consumer is the model the family's layer spec builds, as
Megatron-Bridge builds it, loaded by ``dist_checkpointing.load`` (TP=1 in process, TP=2 under
torchrun, or the refusal ``convert validate`` gives when the query groups do not split); the flags
hf2mcore writes are checked *not* to load (they describe another model).
"""
import json
from pathlib import Path

import pytest
import torch

from convert import hf2mcore, mcore2hf
from runtime import megatron_lm
from runtime import megatron as rt
from convert.formats import HFCheckpoint
from convert.formats import checkpoint_dir
from convert.validate.checks import Reference
from convert_helpers import consumer_logits_per_layout, hf_tensors
from mapping.layout import per_layer_keys
from mapping.registry import family_for
from tools.make_tiny import make_from_config
from tools.shrink import SIZE_FIELDS, shrink, with_sizes

PUBLISHED = Path(__file__).with_name("fixtures") / "published"
MODELS = sorted(p.name for p in PUBLISHED.iterdir() if p.is_dir())
SAVED_BY_TRANSFORMERS = {"DeepSeek-R1"}
FAMILY_BUILT = {m for m in MODELS if (PUBLISHED / m / "consumer.txt").is_file()}  # no Megatron-LM flags
MOE = [m for m in MODELS if family_for(cfg := json.loads((PUBLISHED / m / "config.json").read_text()))
       .read_config(cfg).num_experts]


def published(model: str) -> dict:
    return json.loads((PUBLISHED / model / "config.json").read_text())


def consumer_flags(model: str, config: dict, mtp_stored: bool) -> str:
    """The published flags with this config's sizes; CPU needs the local spec. Without a stored
    MTP layer the user drops --mtp-num-layers (hf2mcore's note says so)."""
    text = with_sizes((PUBLISHED / model / "megatron_lm_args.txt").read_text(), config)
    lines = [ln for ln in text.splitlines() if mtp_stored or not ln.startswith("--mtp-num-layers")]
    return "\n".join(lines + ["--transformer-impl local"])


def overrides(model: str) -> dict | None:
    path = PUBLISHED / model / "config_overrides.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")} if path.is_file() else None


def _fabricate(model: str, root: Path) -> Path:
    cfg = shrink(published(model))
    if model not in SAVED_BY_TRANSFORMERS:
        return make_from_config(cfg, root / "hf")
    from transformers import AutoModelForCausalLM

    cfg.pop("quantization_config", None)  # a bf16 fine-tune: transformers drops it on save
    src = make_from_config(cfg, root / "fabricated")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(root / "hf")
    return root / "hf"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """model -> dict(hf, out, config, ids, ref logits), built once per module on first use."""
    cache = {}

    def get(model):
        if model not in cache:
            root = tmp_path_factory.mktemp(model)
            hf = _fabricate(model, root)
            res = hf2mcore.run(str(hf), str(root / "mcore"))
            cfg = json.loads((hf / "config.json").read_text())
            ids_BS = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
            ref = Reference(HFCheckpoint(hf), ids_BS, root / "ref").logits(torch.float32)
            cache[model] = dict(hf=hf, out=root / "mcore", config=cfg, ids=ids_BS, ref=ref, res=res)
        return cache[model]
    yield get
    rt.destroy_distributed()


def _assert_close(model, got_BSV, z):
    ref = z["ref"]
    diff = (got_BSV[..., : ref.shape[-1]] - ref).abs().max().item()
    assert diff <= 1e-4 * max(1.0, ref.abs().max().item()), f"{model}: max |dlogit| {diff:.3g}"


# --------------------------------------------------------------------------- the shrink rule
def _structure(cfg: dict) -> dict:
    """What the shrink rule must keep, read through the family's own translation."""
    m = family_for(cfg).read_config(cfg)
    t = m.transformer
    return dict(family=m.family, mla=m.mla, tied=m.tie_embeddings, per_layer=per_layer_keys(t),
                dense_layers=m.num_layers - len(m.moe_layers) if m.num_experts else None,
                moe_all_layers=bool(m.num_experts) and len(m.moe_layers) == m.num_layers,
                q_lora=t.get("q_lora_rank") is not None, mtp=t.get("mtp_num_layers"),
                shared=bool(t.get("moe_shared_expert_intermediate_size")),
                groups=(t.get("moe_router_num_groups") or 1) > 1,
                topk_per_group=(t["moe_router_topk"] // t["moe_router_group_topk"]  # group ranking
                                if (t.get("moe_router_num_groups") or 1) > 1 else None),
                rope=(t.get("rope_type"), m.rope.get("rope_scaling"), t.get("rotary_scaling_factor"),
                      m.rope.get("rope_scaling_factor")),
                gqa=t.get("num_query_groups") not in (None, t["num_attention_heads"]), notes=m.notes)


@pytest.mark.parametrize("model", MODELS)
def test_shrink_changes_sizes_only(model):
    full, small = published(model), shrink(published(model))
    assert {k: v for k, v in small.items() if k not in SIZE_FIELDS} == \
        {k: v for k, v in full.items() if k not in SIZE_FIELDS}
    assert small["hidden_size"] < full["hidden_size"] and small["num_hidden_layers"] <= full["num_hidden_layers"]
    assert _structure(small) == _structure(full)


# --------------------------------------------------------------------------- the consumer
def test_family_built_models_are_the_families_megatron_lm_cannot_build():
    for model in MODELS:
        gap = family_for(published(model)).megatron_lm_gap
        assert bool(gap) == (model in FAMILY_BUILT), model
        assert (PUBLISHED / model / "megatron_lm_args.txt").is_file() == (model not in FAMILY_BUILT), model


def family_built(z, tp: int = 1):
    """The converted model built with its family's layer spec and loaded by dist_checkpointing.load."""
    from convert_helpers import mcore_logits, mcore_model_from

    rt.init_distributed(tp=tp)
    model, m = mcore_model_from(z["out"], tp=tp)
    return mcore_logits(model, m, z["ids"])


@pytest.mark.parametrize("model", MODELS)
def test_megatron_lm_consumer_loads_and_matches_tp1(zoo, model):
    z = zoo(model)
    if model in FAMILY_BUILT:
        _assert_close(model, family_built(z), z)
        return
    args = megatron_lm.parse_flags(consumer_flags(model, z["config"], z["res"]["mtp"] == "present"))
    net = megatron_lm.build_model(args, overrides=overrides(model))
    megatron_lm.load(net, checkpoint_dir(z["out"]))
    _assert_close(model, megatron_lm.logits(net, z["ids"]), z)


@pytest.mark.parametrize("model", MODELS)
def test_flags_hf2mcore_writes_build_a_model_that_loads(zoo, model):
    z = zoo(model)
    text = (z["out"] / hf2mcore.ARGS_FILE).read_text() + "\n--transformer-impl local"
    net = megatron_lm.build_model(megatron_lm.parse_flags(text), overrides=overrides(model))
    if model in FAMILY_BUILT:  # the flags describe a stock GPT layer: the checkpoint has more in it
        with pytest.raises(Exception, match="post_layernorm"):
            megatron_lm.load(net, checkpoint_dir(z["out"]))
        return
    megatron_lm.load(net, checkpoint_dir(z["out"]))
    _assert_close(model, megatron_lm.logits(net, z["ids"]), z)


LAYOUTS = {(2, 1): [m for m in MODELS if m not in FAMILY_BUILT], (1, 2): [m for m in MOE if m not in FAMILY_BUILT]}


@pytest.fixture(scope="module")
def layout_logits(zoo, tmp_path_factory):
    def cases_for(tp, ep):
        return {m: dict(flags=consumer_flags(m, zoo(m)["config"], zoo(m)["res"]["mtp"] == "present"),
                        config=zoo(m)["hf"] / "config.json", ckpt=checkpoint_dir(zoo(m)["out"]),
                        overrides=overrides(m)) for m in LAYOUTS[tp, ep]}
    ids = {m: zoo(m)["ids"] for m in LAYOUTS[2, 1]}
    first = next(iter(ids.values()))
    assert all(torch.equal(i, first) for i in ids.values())  # one token batch for all models
    return consumer_logits_per_layout(cases_for, first, tmp_path_factory)


@pytest.mark.multiproc
@pytest.mark.parametrize("model,tp,ep", [(m, tp, ep) for (tp, ep), ms in LAYOUTS.items() for m in ms])
def test_megatron_lm_consumer_loads_and_matches_torchrun(zoo, layout_logits, model, tp, ep):
    got = layout_logits(tp, ep)[model]
    assert not isinstance(got, str), got
    _assert_close(model, got, zoo(model))


@pytest.mark.multiproc
@pytest.mark.parametrize("model", sorted(FAMILY_BUILT))
def test_family_built_model_matches_tp2_or_is_refused(zoo, model, tmp_path):
    """TP=2 under torchrun where the query groups split; otherwise the one-line refusal validate gives."""
    import os
    import subprocess
    import sys

    from convert.validate import ValidateError
    from convert.validate.layouts import check_layout
    from convert.validate.worker import Layout
    from runtime.net import free_port

    z = zoo(model)
    m = family_for(z["config"]).read_config(z["config"])
    groups = m.transformer["num_query_groups"]
    if groups % 2:
        with pytest.raises(ValidateError, match=f"{groups} query groups do not split over tp2"):
            check_layout(Layout(tp=2), m, z["ids"].shape[1])
        return
    torch.save({"ids": z["ids"], "ref": z["ref"]}, tmp_path / "ref.pt")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(root / "tests/workers/convert_logits.py"), "--mcore", str(z["out"]), "--tp", "2",
           "--ref", str(tmp_path / "ref.pt")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.count("OK") == 2, r.stdout[-3000:] + r.stderr[-3000:]


# --------------------------------------------------------------------------- round trip, plan
@pytest.mark.parametrize("model", MODELS)
def test_round_trip_bitwise(zoo, model, tmp_path):
    z = zoo(model)
    mcore2hf.run(str(z["out"]), str(tmp_path / "back"))
    want, got = hf_tensors(z["hf"]), hf_tensors(tmp_path / "back")
    assert sorted(want) == sorted(got)
    bad = [k for k in want if want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k])]
    assert not bad, f"{model}: {len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_dry_run_full_size_on_8_and_64_ranks(model, tmp_path):
    from tools.fake_checkpoint import fake_checkpoint

    fake_checkpoint(PUBLISHED / model / "config.json", tmp_path / "hf")
    plans = hf2mcore.dry_run(str(tmp_path / "hf"), str(tmp_path / "out"), [8, 64])
    assert [p["ranks"] for p in plans] == [8, 64]
    for p in plans:
        assert p["family"] == family_for(published(model)).name and sum(p["rank_bytes"]) == p["bytes"]
        assert min(p["rank_tensors"]) >= 1
    for p in plans:  # no rank holds more than 5% over the best any tensor-granular split could do
        assert max(p["rank_bytes"]) <= 1.05 * max(p["bytes"] / p["ranks"], p["largest_tensor_bytes"])
    assert plans[0]["layers"] == ("per-layer" if _structure(published(model))["per_layer"] else "stacked")
    assert not (tmp_path / "out").exists()
