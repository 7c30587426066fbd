"""The rule types and plans in isolation: hand-built tensors with known layouts, definition-time
checks, and completeness errors that name the tensors."""
import pytest
import torch

from mapping import rules as R
from mapping.family import ModelConfig, padded_vocab
from mapping.entries import PlanError, check_complete, expand
from mapping.rules import Rule, Shapes


def test_qkv_interleaves_per_query_group_and_back():
    # 2 groups, 2 query heads per group, head dim 1, hidden 3: rows labelled by origin.
    s = Shapes(num_query_groups=2, heads_per_group=2, head_dim=1)
    q = torch.tensor([[10.] * 3, [11.] * 3, [12.] * 3, [13.] * 3])  # heads q0..q3
    k = torch.tensor([[20.] * 3, [21.] * 3])
    v = torch.tensor([[30.] * 3, [31.] * 3])
    rule = Rule("a.w", ("q", "k", "v"), op="qkv", tp="column")
    fused = R.to_mcore(rule, [q, k, v], s)
    assert fused[:, 0].tolist() == [10, 11, 20, 30, 12, 13, 21, 31]  # group 0: q0 q1 k0 v0, group 1 ...
    back = R.to_hf(rule, fused, s)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))
    bias = R.to_mcore(rule, [q[:, 0], k[:, 0], v[:, 0]], s)
    assert bias.tolist() == [10, 11, 20, 30, 12, 13, 21, 31]


def test_gate_up_merge_tp_undoes_runtime_layout():
    gate, up = torch.arange(8.).reshape(4, 2), torch.arange(8., 16.).reshape(4, 2)
    rule = Rule("m.fc1", ("g", "u"), op="gate_up", tp="column")
    full = R.to_mcore(rule, [gate, up], Shapes())
    assert torch.equal(full, torch.cat([gate, up]))
    # TP=2 run time: rank r holds [gate_r; up_r]
    shards = [torch.cat([gate[2 * r:2 * r + 2], up[2 * r:2 * r + 2]]) for r in range(2)]
    assert torch.equal(R.merge_tp(rule, shards), full)
    assert not torch.equal(torch.cat(shards), full)  # plain concatenation would be wrong


def test_row_and_column_merge():
    w = torch.arange(24.).reshape(4, 6)
    assert torch.equal(R.merge_tp(Rule("x", "y", tp="row"), list(w.chunk(2, dim=1))), w)
    assert torch.equal(R.merge_tp(Rule("x", "y", tp="column"), list(w.chunk(2, dim=0))), w)
    assert torch.equal(R.merge_tp(Rule("x", "y"), [w, w]), w)


def test_vocab_padding_round_trip():
    s = Shapes(vocab_size=5, padded_vocab_size=padded_vocab(5, 4))
    emb = torch.randn(5, 3)
    rule = Rule("e", "h", op="vocab", tp="column")
    padded = R.to_mcore(rule, [emb], s)
    assert padded.shape == (8, 3) and padded[5:].abs().sum() == 0
    assert torch.equal(R.to_hf(rule, padded, s)[0], emb)
    with pytest.raises(ValueError, match="vocab rows"):
        R.to_mcore(rule, [torch.randn(6, 3)], s)


def test_shared_copies_must_agree():
    s = Shapes(vocab_size=2, padded_vocab_size=2)
    rule = Rule("e", ("a", "b"), op="vocab_shared")
    t = torch.randn(2, 3)
    assert torch.equal(R.to_mcore(rule, [t, t.clone()], s), t)
    with pytest.raises(ValueError, match="differ"):
        R.to_mcore(rule, [t, t + 1], s)


@pytest.mark.parametrize("kw,msg", [
    (dict(mcore="d.{L}.w", hf=("m.{L}.a", "m.{L}.b")), "takes 1 HF"),
    (dict(mcore="d.{L}.w", hf="m.w"), "placeholders differ"),
    (dict(mcore="d.{L}.{E}.w", hf="m.{L}.w"), "placeholders differ"),
    (dict(mcore="d.w", hf="m.w", op="transpose"), "unknown op"),
    (dict(mcore="d.w", hf="m.w", tp="diagonal"), "tp must be"),
])
def test_rules_are_checked_when_defined(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Rule(**kw)


def _model(layers=2, experts=0):
    return ModelConfig("t", {}, False, layers, experts, (), 4, 4, 16, False, {}, Shapes(), "float32")


def test_expand_generates_layer_and_expert_rows():
    rules = [Rule("d.{L}.w", "m.{L}.w"), Rule("d.{L}.x.{E}.w", "m.{L}.e.{E}.w", expert=True, layers=(1,))]
    entries = expand(rules, _model(layers=2, experts=3))
    assert [e.mcore for e in entries] == ["d.0.w", "d.1.w", "d.1.x.0.w", "d.1.x.1.w", "d.1.x.2.w"]
    assert entries[3].hf == ("m.1.e.1.w",) and entries[3].layer == 1 and entries[3].expert == 1


def test_completeness_errors_name_the_tensors():
    entries = expand([Rule("d.{L}.w", "m.{L}.w"), Rule("d.x", "m.0.w")], _model())
    with pytest.raises(PlanError) as err:
        check_complete(entries, ["m.0.w", "m.1.w", "m.extra"], ["d.0.w", "d.1.w", "d.missing"])
    text = str(err.value)
    assert "mapped more than once: m.0.w" in text
    assert "rule maps: m.extra" in text
    assert "no rule produces: d.missing" in text
    assert "does not have: d.x" in text
    with pytest.raises(PlanError, match="absent: m.1.w"):
        check_complete(entries[:1] + expand([Rule("d.1.w", "m.1.w")], _model()), ["m.0.w"])
