"""Masked importance sampling, GSPO and the group index, from the loss up to the trainer's config and loop.

Expected values are worked out by hand in each test with plain arithmetic (math.exp / math.log),
never by calling the code under test; tensors are float64 so the comparisons can be tight.
The loop test runs two in-process steps (transformers engine, no Ray, no vLLM, ~15 s).
"""
import math
from pathlib import Path

import pytest
import torch

from rl.batch import build_batch
from rl.config import describe, load_config
from rl.corrections import CORRECTIONS, masked_is_weights
from rl.grpo import LossConfig, grpo_loss
from rl.rollout.base import Sample

from rl_helpers import PARITY, TINY, tiny_policy

ROOT = Path(__file__).resolve().parents[1]
LOG = math.log
F64 = torch.float64


def _rows(*rows, T):
    """(values_BT, mask_BT) from ragged rows; padding holds nan, which must never leak."""
    x = torch.full((len(rows), T), float("nan"), dtype=F64)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, row in enumerate(rows):
        x[b, : len(row)] = torch.tensor(row, dtype=F64)
        mask[b, : len(row)] = True
    return x, mask


# -- masked importance sampling ---------------------------------------------------------------
def test_masked_is_token_masks_exactly_the_out_of_band_tokens():
    d = 1e-4
    # log(pi_trainer / pi_rollout) per token; band [0.5, 2.0]
    lr, mask = _rows([LOG(2.0) - d, LOG(2.0) + d, LOG(0.5) + d, LOG(0.5) - d],  # in, out, in, out
                     [0.0, 3.0],                                                # in, out (ratio e^3 = 20)
                     T=4)
    old = torch.where(mask, -torch.arange(8, dtype=F64).view(2, 4) / 4, torch.nan)
    rollout = old - lr
    w, keep = masked_is_weights(old, rollout, mask, 0.5, 2.0, per_sequence=False)
    assert keep.tolist() == [[True, False, True, False], [True, False, False, False]]
    expected_w = [[2.0 * math.exp(-d), 0.0, 0.5 * math.exp(d), 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert w.tolist()[0] == pytest.approx(expected_w[0], rel=1e-12)
    assert w.tolist()[1] == pytest.approx(expected_w[1], rel=1e-12)

    # Through the loss: on-policy (ratio 1, nothing clipped), token-mean over the 6 real tokens.
    cfg = LossConfig(correction="masked_is_token", is_band_low=0.5, is_band_high=2.0)
    logp = torch.where(mask, old, torch.tensor(1e4, dtype=F64)).requires_grad_()
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    loss, m = grpo_loss(cfg, logp_BT=logp, old_logp_BT=old, adv_B=adv, mask_BT=mask, rollout_logp_BT=rollout)
    assert m["mismatch/masked_frac"].item() == 3 / 6  # hand count: 3 of the 6 response tokens out of band
    w0, w2 = 2.0 * math.exp(-d), 0.5 * math.exp(d)
    assert loss.item() == pytest.approx((-1.0 * (w0 + w2) + 2.0 * 1.0) / 6, rel=1e-12)
    assert m["mismatch/is_weight_mean"].item() == pytest.approx((w0 + w2 + 1.0) / 6, rel=1e-12)
    loss.backward()
    # d loss / d logp_t = -A_i w_t / N_tok: exactly 0 on masked tokens and padding
    expected_grad = [[-w0 / 6, 0.0, -w2 / 6, 0.0], [2.0 / 6, 0.0, 0.0, 0.0]]
    for got, want in zip(logp.grad.tolist(), expected_grad):
        assert got == pytest.approx(want, rel=1e-12, abs=0)


def test_masked_is_seq_masks_whole_sequences_by_their_geometric_mean():
    d = 1e-4
    # row 0: mean log ratio log 2 - d (kept) although token 0 alone (ratio 2.7) is out of band;
    # row 1: mean log 0.5 - d (masked whole) although token 0 alone (ratio 0.82) is in band;
    # row 2: mean 0 (kept).
    lr, mask = _rows([LOG(2.0) + 0.3, LOG(2.0) - 0.3 - 2 * d],
                     [LOG(0.5) - d + 0.5, LOG(0.5) - d - 0.5],
                     [0.1, -0.1, 0.0], T=4)
    old = torch.where(mask, torch.full_like(lr, -1.0), torch.nan)
    rollout = old - lr
    cfg = LossConfig(correction="masked_is_seq", is_band_low=0.5, is_band_high=2.0)
    w, keep = masked_is_weights(old, rollout, mask, 0.5, 2.0, per_sequence=True)
    assert keep.tolist() == [[True, True, False, False], [False, False, False, False], [True, True, True, False]]
    r0 = 2.0 * math.exp(-d)
    assert w[0, :2].tolist() == pytest.approx([r0, r0], rel=1e-12) and w[1].tolist() == [0.0] * 4
    assert w[2, :3].tolist() == pytest.approx([1.0, 1.0, 1.0], rel=1e-12)
    # the token level would decide differently on rows 0 and 1
    _, keep_tok = masked_is_weights(old, rollout, mask, 0.5, 2.0, per_sequence=False)
    assert keep_tok[0, :2].tolist() == [False, True] and keep_tok[1, :2].tolist() == [True, False]

    logp = torch.where(mask, old, torch.zeros_like(old)).requires_grad_()  # on-policy: ratio 1
    loss, m = grpo_loss(cfg, logp_BT=logp, old_logp_BT=old, adv_B=torch.tensor([1.0, 1.0, -1.0], dtype=F64),
                        mask_BT=mask, rollout_logp_BT=rollout)
    assert int((mask & ~keep).sum()) == 2  # hand count: row 1's 2 of the 7 response tokens
    assert m["mismatch/masked_frac"].item() == pytest.approx(2 / 7, rel=1e-7)  # a float32 metric
    assert loss.item() == pytest.approx((-2 * r0 + 3 * 1.0) / 7, rel=1e-12)
    loss.backward()
    assert logp.grad[1].tolist() == [0.0] * 4


def test_corrections_need_rollout_logprobs_and_tis_is_one_of_them():
    assert sorted(CORRECTIONS) == ["masked_is_seq", "masked_is_token", "none", "tis"]
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="needs rollout_logp_BT"):
        grpo_loss(LossConfig(correction="masked_is_token"), logp_BT=x, adv_B=torch.ones(1),
                  mask_BT=torch.ones(1, 2, dtype=torch.bool))
    assert not LossConfig().needs_rollout_logp and LossConfig(correction="tis").needs_rollout_logp


# -- GSPO ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("a1, clipped", [(-1.0, True), (1.0, False)])
def test_gspo_loss_and_gradient_match_hand_computation(a1, clipped):
    # Two responses: row 0 has 2 tokens (+1 padding), row 1 has 3. Token log-ratios logp - old:
    lr0, lr1 = [0.3, -0.2996], [0.01, -0.02, 0.007]         # means 0.0002 and -0.001
    s0, s1 = math.exp(0.0002), math.exp(-0.001)              # 1.00020002, 0.99900050
    old, mask = _rows([-1.0, -2.0], [-0.5, -1.5, -0.7], T=3)
    logp = (old + _rows(lr0, lr1, T=3)[0])
    logp = torch.where(mask, logp, torch.tensor(5.0, dtype=F64)).requires_grad_()  # finite junk in padding
    cfg = LossConfig(policy_loss="gspo", aggregation="seq-mean-token-mean")  # clip 1 - 3e-4, 1 + 4e-4
    loss, m = grpo_loss(cfg, logp_BT=logp, old_logp_BT=old, adv_B=torch.tensor([1.0, a1], dtype=F64), mask_BT=mask)
    # row 0: A = 1, s0 = 1.0002 inside [0.9997, 1.0004]: per-token term -A s0 = -s0, gradient -A s0 d logp_t
    # row 1: s1 = 0.9990 below 0.9997. A = -1: max(-A s1, -A clip(s1)) = max(s1, 0.9997) = 0.9997, clipped,
    #        no gradient. A = +1: max(-s1, -0.9997) = -s1, not clipped (A > 0 clips only above 1.0004).
    term1 = 0.9997 if clipped else -s1
    # seq-mean-token-mean: (mean over row 0's 2 tokens + mean over row 1's 3 tokens) / 2 sequences
    assert loss.item() == pytest.approx((-s0 + term1) / 2, rel=1e-12)
    loss.backward()
    g = logp.grad.tolist()
    # every token of row 0 gets -A s0 / (2 seqs * 2 tokens), although its own ratios (e^0.3, e^-0.2996) differ
    assert g[0] == pytest.approx([-s0 / 4, -s0 / 4, 0.0], rel=1e-12, abs=0)
    g1 = 0.0 if clipped else -s1 / 6                           # -A s1 / (2 seqs * 3 tokens)
    assert g[1] == pytest.approx([g1] * 3, rel=1e-12, abs=0)
    assert m["clip_frac"].item() == pytest.approx(3 / 5 if clipped else 0.0)  # tokens of clipped sequences
    assert m["ratio_mean"].item() == pytest.approx((2 * s0 + 3 * s1) / 5, rel=1e-12)
    assert m["ratio_max"].item() == pytest.approx(s0, rel=1e-12)


def test_gspo_differs_from_grpo_on_the_same_batch():
    old, mask = _rows([-1.0, -2.0], T=2)
    logp = (old + torch.tensor([[0.3, -0.2996]], dtype=F64)).requires_grad_()
    adv = torch.ones(1, dtype=F64)
    grpo, _ = grpo_loss(LossConfig(aggregation="seq-mean-token-mean"), logp_BT=logp, old_logp_BT=old, adv_B=adv,
                        mask_BT=mask)
    gspo, _ = grpo_loss(LossConfig(policy_loss="gspo", aggregation="seq-mean-token-mean"), logp_BT=logp,
                        old_logp_BT=old, adv_B=adv, mask_BT=mask)
    # GRPO, token ratios e^0.3 (clipped at 1.2) and e^-0.2996: -(1.2 + e^-0.2996) / 2 = -0.970
    assert grpo.item() == pytest.approx(-(1.2 + math.exp(-0.2996)) / 2, rel=1e-12)
    # GSPO, one sequence ratio e^0.0002 inside [0.9997, 1.0004]: -e^0.0002 = -1.0002
    assert gspo.item() == pytest.approx(-math.exp(0.0002), rel=1e-12)


# -- configuration ---------------------------------------------------------------------------------
def test_tis_cap_must_be_positive():
    with pytest.raises(ValueError, match="tis_cap must be > 0"):
        load_config(TINY, ["loss.correction=tis", "loss.tis_cap=0"])


@pytest.mark.parametrize("override, match", [
    ("loss.is_band_low=1.0", "is_band_low=1.0"),
    ("loss.is_band_low=1.5", "need 0 < is_band_low < 1 < is_band_high"),
    ("loss.is_band_low=0", "is_band_low=0.0"),
    ("loss.is_band_low=-0.5", "is_band_low=-0.5"),
    ("loss.is_band_high=1.0", "is_band_high=1.0"),
    ("loss.is_band_high=0.9", "is_band_high=0.9"),
    ("loss.tis_cap=2.0", "loss.tis_cap is set but loss.correction is 'none'"),  # no silent no-op
    ("loss.correction=icepop", "unknown LossConfig.correction 'icepop'"),
    ("loss.policy_loss=ppo", "unknown LossConfig.policy_loss 'ppo'"),
    ("loss.policy_loss=gspo", "set aggregation='seq-mean-token-mean'"),
])
def test_bad_loss_configs_are_one_line_errors_at_load(override, match):
    with pytest.raises((ValueError, KeyError), match=match) as err:
        load_config(TINY, [override])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("extra, match", [
    ("loss.correction=tis", "reweights single tokens; use correction='masked_is_seq' or 'none'"),
    ("loss.correction=masked_is_token", "correction='masked_is_token' reweights single tokens"),
    ("loss.dual_clip_c=3.0", "dual_clip_c=3.0 is GRPO's token-level dual clip"),
])
def test_gspo_with_token_level_options_is_an_error_at_load(extra, match):
    gspo = ["loss.policy_loss=gspo", "loss.aggregation=seq-mean-token-mean"]
    load_config(TINY, gspo)  # fine alone
    for overrides in (gspo + [extra], [extra] + gspo):  # the order of overrides does not matter
        with pytest.raises(ValueError, match=match) as err:
            load_config(TINY, overrides)
        assert "\n" not in str(err.value)


def test_overrides_apply_together_in_any_order():
    want = ["loss.correction=masked_is_seq", "loss.policy_loss=gspo", "loss.aggregation=seq-mean-token-mean"]
    for order in (want, want[::-1], want[1:] + want[:1]):
        loss = load_config(TINY, order).loss
        assert (loss.policy_loss, loss.correction, loss.aggregation) == ("gspo", "masked_is_seq", "seq-mean-token-mean")
    assert load_config(TINY, ["run.steps=3", "run.steps=5"]).run.steps == 5  # the last one wins


def test_every_shipped_config_loads_and_the_gpu_ones_choose_a_correction():
    for path in sorted((ROOT / "rl/configs").glob("*.yaml")):
        load_config(path)
    ds = load_config(ROOT / "rl/configs/moonlight_16b.yaml").loss
    assert (ds.policy_loss, ds.correction, ds.is_band_low, ds.is_band_high) == ("grpo", "masked_is_token", 0.5, 5.0)
    q = load_config(ROOT / "rl/configs/qwen3_30b_a3b.yaml").loss
    assert (q.policy_loss, q.correction, q.aggregation) == ("gspo", "masked_is_seq", "seq-mean-token-mean")
    assert (q.gspo_clip_eps_low, q.gspo_clip_eps_high) == (3e-4, 4e-4)
    text = describe()
    for key in ("loss.policy_loss='grpo'", "loss.correction='none'", "loss.is_band_low=0.5",
                "loss.gspo_clip_eps_high=0.0004"):
        assert key in text, key


# -- batch assembly and the loop ---------------------------------------------------------------------
def test_build_batch_names_each_rows_group():
    s = Sample((7,), (-0.5,), "stop")
    batch = build_batch([(1, 2), (3,), (1, 2)], [[s, s, s], [s], [s, s]])  # a prompt may come twice
    assert batch["group_B"].tolist() == [0, 0, 0, 1, 2, 2]
    with pytest.raises(ValueError, match="3 prompts but 2 sample groups"):
        build_batch([(1,), (2,), (3,)], [[s], [s]])




@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("rl_losses"))


LOOP_SWITCHES = {
    "gspo-masked_is_seq": ["loss.policy_loss=gspo", "loss.aggregation=seq-mean-token-mean",
                           "loss.correction=masked_is_seq"],
    # a band of +-1e-6 in log ratio: the transformers engine and MCore differ by ~1e-6 per token in fp32
    "grpo-masked_is_token": ["loss.correction=masked_is_token", "loss.is_band_low=0.999999",
                             "loss.is_band_high=1.000001"],
}


@pytest.mark.parametrize("switches", LOOP_SWITCHES.values(), ids=LOOP_SWITCHES.keys())
def test_loop_trains_with_the_switches(model_dir, tmp_path, switches):
    """The switches reach the trainer ranks: the rollout log-probs travel with the batch (else the loss
    raises), the step logs mismatch/masked_frac over the whole batch, and the trainer's own token-weighted
    value of it (one update per step) is the same number; a band narrower than the largest mismatch masks."""
    from rl.metrics import read
    from rl.train import train

    cfg = load_config(TINY, [
        f"run.dir={tmp_path / 'run'}", f"model.path={model_dir}", f"run.reward={PARITY}", "optim.lr=1e-4",
        "rollout.engine=transformers", "ray.enabled=false", "run.steps=2", "run.eval_every=0",
        "run.checkpoint_every=0", "run.export_hf=false", "run.log_kl=false", *switches])
    rows = read(train(cfg))
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        frac = r["mismatch/masked_frac"]
        assert 0.0 <= frac < 1.0 and r["actor/grad_norm"] > 0
        assert r["actor/mismatch/masked_frac"] == pytest.approx(frac, abs=1e-6)
        assert 0.0 <= r["reward/uniform_group_frac"] <= 1.0
        assert r["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-3)  # one update per step: ratio 1 at the start
        if cfg.loss.correction == "masked_is_token" and r["mismatch/logprob_abs_diff_max"] > 2e-6:
            assert frac > 0  # some token left the band, so something was masked
