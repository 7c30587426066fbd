"""Sequence packing (rl.packing, model.packing): the packed forward computes the same log-probs,
entropies, loss and gradient as the right-padded one, on a tiny dense Qwen2 and a tiny Qwen3-MoE
converted with hf2mcore (and DeepSeek-V3's MLA), without computing padding; configs that cannot pack
are one-line errors at start-up. Marked multiproc: the same at TP=2 (sequence parallel) and EP=2 x DP=2
(packs of equal length across ranks for the MoE token dispatch), under torchrun.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl.config import ModelSection, load_config
from rl.packing import Packed, check_model, pack, unpack

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "rl/configs/tiny.yaml"
ATOL = 1e-5  # fp32: summation order differs between one padded SDPA call and one call per sequence


# ------------------------------------------------------------------------------ pack / unpack
def test_pack_and_unpack_by_hand():
    tokens = torch.tensor([[11, 12, 13], [21, 0, 0], [31, 32, 0]])
    p = pack(tokens, torch.tensor([3, 1, 2]), multiple=4)
    assert p.tokens_1t.tolist() == [[11, 12, 13, 21, 31, 32, 0, 0]]  # 6 real tokens + a tail of 2 to reach 8
    assert p.positions_1t.tolist() == [[0, 1, 2, 0, 0, 1, 0, 1]]    # restart in every sequence
    assert p.cu_seqlens_n.tolist() == [0, 3, 4, 6, 8] and p.cu_seqlens_n.dtype == torch.int32
    assert (p.max_seqlen, p.real, p.computed) == (3, 6, 8)
    assert pack(tokens, torch.tensor([3, 1, 2]), total=7).cu_seqlens_n.tolist() == [0, 3, 4, 6, 7]
    x = torch.arange(8.0)[None] * 10  # "prediction" at packed position j = 10 j
    # row 0 predicts from packed 0, 1; row 1 (one token) predicts nothing; row 2 from packed 4
    assert unpack(x, p, T=2).tolist() == [[0.0, 10.0], [0.0, 0.0], [40.0, 0.0]]
    with pytest.raises(ValueError, match="row lengths"):
        pack(tokens, torch.tensor([3, 0, 2]))


# ------------------------------------------------------------------------------ the policy forward
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from convert import hf2mcore
    from tools.make_tiny import cached_tiny

    cache = {}

    def get(family):
        if family not in cache:
            out = tmp_path_factory.mktemp(family) / "mcore"
            hf2mcore.run(str(cached_tiny(family, "fp32")), str(out))
            cache[family] = out
        return cache[family]
    return get


def _policies(model_dir):
    from runtime import megatron as rt
    from rl.config import OptimSection
    from rl.policy import Policy

    rt.init_local()
    return {k: Policy(model_dir, ModelSection(packing=k), optim=OptimSection(lr=1e-3)) for k in (False, True)}


def _batch(vocab: int, lengths=(19, 11, 16, 5, 13)):
    g = torch.Generator().manual_seed(1)
    lengths_B = torch.tensor(lengths)
    tokens_BS = torch.randint(5, vocab, (len(lengths), max(lengths)), generator=g)
    for b, n in enumerate(lengths):
        tokens_BS[b, n:] = 0
    return tokens_BS, lengths_B


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe", "deepseek_v3"])
def test_packed_logprobs_equal_padded(converted, family):
    pol = _policies(converted(family))
    tokens_BS, lengths_B = _batch(pol[False].m.vocab_size)
    padded = pol[False].logprobs(tokens_BS, lengths_B, micro_batch_size=3, with_entropy=True)
    packed = pol[True].logprobs(tokens_BS, lengths_B, micro_batch_size=3, with_entropy=True)
    for a, b in zip(padded, packed):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    assert padded[0].abs().max() > 1  # real log-probs, not zeros

    # Control: the same pack run as ONE sequence (no boundaries: attention and rope run across rows)
    # must differ, so the equality above rests on both restarting at each boundary.
    from rl.logprobs import vocab_parallel_logp_entropy
    from rl.packing import labels

    p = pack(tokens_BS[:3], lengths_B[:3])
    whole = Packed(p.tokens_1t, torch.arange(p.computed)[None], torch.tensor([0, p.computed], dtype=torch.int32),
                   p.computed, (p.computed,))
    with torch.no_grad():
        logits = pol[True].model(p.tokens_1t, whole.positions_1t, None, packed_seq_params=whole.params())
    lp, _ = vocab_parallel_logp_entropy(logits, labels(p), pol[True].m.vocab_size, with_entropy=False)
    lp = unpack(lp, p, tokens_BS.shape[1] - 1)
    torch.testing.assert_close(lp[0], padded[0][0], atol=ATOL, rtol=0)  # row 0 comes first: unaffected
    assert (lp[1:] - padded[0][1:3]).abs().max() > 1e-2  # rows 1, 2 saw row 0's tokens


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
def test_packed_update_equals_padded_and_computes_no_padding(converted, family):
    from rl.grpo import LossConfig

    pol = _policies(converted(family))
    pol[True].model.load_state_dict(pol[False].model.state_dict())
    tokens_BS, lengths_B = _batch(pol[False].m.vocab_size, lengths=(19, 11, 16, 5))
    mask_BT = torch.zeros(4, tokens_BS.shape[1] - 1, dtype=torch.bool)
    for b, n in enumerate(lengths_B.tolist()):
        mask_BT[b, 2: n - 1] = True  # a 3-token prompt, then the response
    old, _ = pol[False].logprobs(tokens_BS, lengths_B, micro_batch_size=4)
    batch = {"tokens_BS": tokens_BS, "lengths_B": lengths_B, "mask_BT": mask_BT, "old_logp_BT": old - 0.05 * mask_BT,
             "adv_B": torch.tensor([1.0, -1.0, 0.5, -0.5])}
    got = {k: p.train_mini_batch(batch, LossConfig(), micro_batch_size=2) for k, p in pol.items()}
    for key in ("loss", "pg_loss", "entropy", "clip_frac", "grad_norm"):
        assert got[True][key] == pytest.approx(got[False][key], rel=1e-5, abs=1e-6), key
    # padded: micro-batches (19, 11) and (16, 5) are 2 x 19 + 2 x 16 = 70 positions for 51 real tokens
    assert (got[False]["computed_positions"], got[False]["padding_positions"]) == (70, 19)
    assert (got[True]["computed_positions"], got[True]["padding_positions"]) == (51, 0)
    after = {k: p.logprobs(tokens_BS, lengths_B, micro_batch_size=4)[0] for k, p in pol.items()}
    assert (after[False] - old).abs().max() > 1e-3  # the step moved the policy ...
    torch.testing.assert_close(after[True], after[False], atol=1e-4, rtol=0)  # ... the same way


# ------------------------------------------------------------------------------ start-up errors
def test_packing_with_context_parallelism_is_a_one_line_config_error():
    load_config(TINY, ["model.packing=true"])  # fine at cp=1
    with pytest.raises(ValueError, match="model.packing=true with model.cp=2") as err:
        load_config(TINY, ["model.packing=true", "model.cp=2", "model.dp=1"])
    assert "\n" not in str(err.value)


def test_an_attention_that_cannot_pack_is_named_at_start_up():
    from runtime.cp_attention import CPCoreAttention
    from runtime.modules import SDPACoreAttention

    assert SDPACoreAttention.accepts_packed_sequences() and not CPCoreAttention.accepts_packed_sequences()

    class PaddedOnlyAttention(torch.nn.Module):
        pass

    model = torch.nn.Module()
    model.layer = torch.nn.Module()
    model.layer.core_attention = PaddedOnlyAttention()
    with pytest.raises(ValueError, match="core attention PaddedOnlyAttention .*set model.packing=false") as err:
        check_model(model, "local")
    assert "\n" not in str(err.value)


def test_policy_refuses_packing_on_a_model_whose_attention_cannot(converted, monkeypatch):
    from runtime import megatron as rt
    from runtime.modules import SDPACoreAttention
    from rl.policy import Policy

    rt.init_local()
    monkeypatch.setattr(SDPACoreAttention, "accepts_packed_sequences", classmethod(lambda cls: False))
    with pytest.raises(ValueError, match="core attention SDPACoreAttention \\(model.spec='local'\\) cannot"):
        Policy(converted("qwen2"), ModelSection(packing=True))


# ------------------------------------------------------------------------------ torchrun layouts
@pytest.mark.multiproc
@pytest.mark.parametrize("family,layout,positions", [
    # TP=2 on a dense model (no sequence parallelism): padded 2 x 19 + 2 x 16, packed 30 and 21 tokens.
    ("qwen2", "tp=2", {False: (70, 19), True: (51, 0)}),
    # (computed, padding) positions, padded then packed, for rows of 19, 11, 16, 5 tokens (51 real) in
    # micro-batches of 2. TP=2 (sequence parallel): lengths even; padded 2 x 20 + 2 x 16, packed 30 and 22.
    ("qwen3_moe", "tp=2", {False: (72, 21), True: (52, 1)}),
    # EP=2 x DP=2: rank 0 holds (19, 11), rank 1 (16, 5); padded both to 19, packed both to 30 tokens.
    ("qwen3_moe", "ep=2,dp=2", {False: (76, 25), True: (60, 9)}),
])
def test_packed_update_equals_padded_across_layouts(converted, family, layout, positions, tmp_path):
    from runtime.net import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), __file__, str(converted(family)), str(tmp_path / "out.pt"), layout]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for key in ("loss", "pg_loss", "entropy", "grad_norm"):
        assert got[True][key] == pytest.approx(got[False][key], rel=1e-5, abs=1e-6), key
    for k in (False, True):
        assert (got[k]["computed_positions"], got[k]["padding_positions"]) == positions[k], k
    torch.testing.assert_close(got["logp"][True], got["logp"][False], atol=ATOL, rtol=0)


def _layout_worker(model_dir: str, out: str, layout: str) -> None:
    """One rank of the torchrun test: padded and packed policies at `layout`, one update each."""
    from runtime import megatron as rt
    from rl.config import OptimSection
    from rl.grpo import LossConfig
    from rl.policy import Policy

    sizes = dict(kv.split("=") for kv in layout.split(","))
    sec = {k: int(sizes.get(k, 1)) for k in ("tp", "ep", "dp")}
    rt.init_distributed(tp=sec["tp"], ep=sec["ep"])
    pol = {k: Policy(model_dir, ModelSection(packing=k, **sec), optim=OptimSection(lr=1e-3)) for k in (False, True)}
    tokens_BS, lengths_B = _batch(pol[False].m.vocab_size, lengths=(19, 11, 16, 5))
    mask_BT = torch.arange(tokens_BS.shape[1] - 1)[None] < (lengths_B[:, None] - 1)
    from rl.schedule import from_rank0

    logp = {k: from_rank0(p.logprobs(tokens_BS, lengths_B, micro_batch_size=2)[0]) for k, p in pol.items()}
    batch = {"tokens_BS": tokens_BS, "lengths_B": lengths_B, "mask_BT": mask_BT, "old_logp_BT": logp[False] - 0.05,
             "adv_B": torch.tensor([1.0, -1.0, 0.5, -0.5])}
    result = {k: p.train_mini_batch(batch, LossConfig(), micro_batch_size=2) for k, p in pol.items()}
    if torch.distributed.get_rank() == 0:
        torch.save({**result, "logp": logp}, out)
    rt.destroy_distributed()


if __name__ == "__main__":
    _layout_worker(*sys.argv[1:4])
