"""A new family is one file: the toy family (``tests/toy_family.py``, Qwen3-MoE with gpt-oss-style
stacked expert tensors, its own transforms and a layer-spec hook) converts with the unchanged
converter, and the truth it is held to comes from elsewhere: the toy checkpoint is a repacking of
a tiny Qwen3-MoE, so its MCore conversion must equal the Qwen3-MoE conversion byte for byte, and
the MCore model must reproduce transformers' Qwen3-MoE logits."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import toy_family
from convert import hf2mcore, mcore2hf
from convert.formats import Reader, checkpoint_dir
from convert_helpers import fixed_tokens, hf_tensors, mcore_logits, mcore_model_from, transformers_logits
from tools.make_tiny import cached_tiny


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(original Qwen3-MoE folder, the same weights in the toy family's layout)."""
    uninstall = toy_family.install()
    src = cached_tiny("qwen3_moe")
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path_factory.mktemp("toy") / "hf"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors, E = hf_tensors(src), cfg["num_experts"]
    packed = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for L in range(cfg["num_hidden_layers"]):
        x = f"model.layers.{L}.mlp.experts."
        gate_up = [torch.stack([tensors[f"{x}{e}.gate_proj.weight"].t(), tensors[f"{x}{e}.up_proj.weight"].t()], -1)
                   .flatten(-2) for e in range(E)]                                   # [H, 2I], interleaved
        packed[x + "gate_up_proj"] = torch.stack(gate_up)                            # [E, H, 2I]
        packed[x + "down_proj"] = torch.stack([tensors[f"{x}{e}.down_proj.weight"].t() for e in range(E)])
    save_file({k: v.contiguous() for k, v in packed.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(dict(cfg, architectures=[toy_family.ARCH])))
    yield src, out
    uninstall()


def test_toy_conversion_equals_the_qwen3_moe_conversion(toy, tmp_path):
    src, out = toy
    hf2mcore.run(str(src), str(tmp_path / "q"))
    res = hf2mcore.run(str(out), str(tmp_path / "t"))
    assert res["family"] == toy_family.NAME
    q, t = Reader(checkpoint_dir(tmp_path / "q")), Reader(checkpoint_dir(tmp_path / "t"))
    keys = sorted(k for k in q.keys() if "/shard_" not in k)
    assert keys == sorted(k for k in t.keys() if "/shard_" not in k)
    for k in keys:
        md = q.tensor_meta(k)
        assert torch.equal(q.read_region(k, [0] * len(md.size), list(md.size)),
                           t.read_region(k, [0] * len(md.size), list(md.size))), k


def test_toy_model_reproduces_transformers_and_uses_the_spec_hook(toy, tmp_path):
    src, out = toy
    hf2mcore.run(str(out), str(tmp_path / "t"))
    toy_family.CountingCoreAttention.calls = 0
    model, m = mcore_model_from(tmp_path / "t")
    assert m.family == toy_family.NAME
    ids = fixed_tokens(m.vocab_size)
    got, want = mcore_logits(model, m, ids), transformers_logits(src, ids)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    assert toy_family.CountingCoreAttention.calls == m.num_layers  # the hook reached the model


def test_toy_round_trip_rebuilds_the_stacked_tensors(toy, tmp_path):
    _, out = toy
    hf2mcore.run(str(out), str(tmp_path / "t"))
    mcore2hf.run(str(tmp_path / "t"), str(tmp_path / "back"), max_shard_size="300KB")
    want, got = hf_tensors(out), hf_tensors(tmp_path / "back")
    assert sorted(want) == sorted(got)
    assert all(torch.equal(want[k], got[k]) for k in want)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert "model.layers.0.mlp.experts.gate_up_proj" in index["weight_map"]
