"""Tests of rl.grpo against hand-computed values, plain-Python peers and the defining properties."""

import math
import statistics

import pytest
import torch

from rl import grpo
from rl import advantages, corrections
from rl.advantages import compute_advantages
from rl.grpo import LossConfig, aggregate, grpo_loss, kl_penalty, ppo_clip_loss

LOG = math.log


# -- advantages -----------------------------------------------------------------------------
def adjacent(P, G):
    """Group ids of P groups of G adjacent rows: 0 x G, 1 x G, ..."""
    return torch.arange(P).repeat_interleave(G)


def test_grpo_advantages_hand_values():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = compute_advantages(r, adjacent(2, 4), name="grpo", eps=0.0)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); 0.5 / sqrt(1/3) = 0.8660254
    expected = [0.8660254, -0.8660254, -0.8660254, 0.8660254, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_drgrpo_advantages_are_mean_centred_without_std():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert compute_advantages(r, adjacent(1, 4), name="drgrpo").tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_grpo_advantages_match_plain_python_peer():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(6 * 5, generator=g)
    adv = compute_advantages(r, adjacent(6, 5), eps=1e-6)
    vals = r.tolist()
    for p in range(6):
        grp = vals[p * 5:(p + 1) * 5]
        mu, sd = statistics.mean(grp), statistics.stdev(grp)
        assert adv[p * 5:(p + 1) * 5].tolist() == pytest.approx([(x - mu) / (sd + 1e-6) for x in grp], rel=1e-5)


@pytest.mark.parametrize("name", sorted(advantages.ADVANTAGES))
def test_identical_rewards_in_a_group_give_zero_advantage(name):
    r = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3])
    adv = compute_advantages(r, adjacent(3, 3), name=name)
    assert torch.equal(adv, torch.zeros(9))
    # also when the group is scattered over the batch (0.1 * 3 / 3 is not 0.1 in fp32: decided by max == min)
    r2 = torch.tensor([0.1, 1.0, 0.1, 0.0, 0.1])
    adv2 = compute_advantages(r2, torch.tensor([4, 2, 4, 2, 4]), name=name)
    assert adv2[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0] and adv2[1] > 0 > adv2[3]


@pytest.mark.parametrize("name", sorted(advantages.ADVANTAGES))
def test_group_of_one_has_zero_advantage_not_nan(name):
    assert torch.equal(compute_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), name=name), torch.zeros(2))


def test_interleaved_groups_of_different_sizes_hand_values():
    """Groups named by id, rows interleaved: the old `view(-1, G)` would have mixed them."""
    r = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.0, 0.3])
    groups = torch.tensor([7, 3, 7, 3, 7, 3, 9, 9, 5])
    # group 7 (rows 0, 2, 4): rewards 1, 0.5, 0 -> mean 0.5, std sqrt((0.25 + 0 + 0.25) / 2) = 0.5
    # group 3 (rows 1, 3, 5): rewards 0, 1, 0 -> mean 1/3, std sqrt((1/9 + 4/9 + 1/9) / 2) = sqrt(1/3)
    # group 9 (rows 6, 7):    rewards 1, 0    -> mean 0.5, std sqrt(0.5)
    # group 5 (row 8):        alone           -> 0
    s3, s9 = math.sqrt(1 / 3), math.sqrt(0.5)
    expected = [0.5 / 0.5, -1 / 3 / s3, 0.0, 2 / 3 / s3, -0.5 / 0.5, -1 / 3 / s3, 0.5 / s9, -0.5 / s9, 0.0]
    assert compute_advantages(r, groups, eps=0.0).tolist() == pytest.approx(expected, abs=1e-6)
    expected_dr = [0.5, -1 / 3, 0.0, 2 / 3, -0.5, -1 / 3, 0.5, -0.5, 0.0]
    assert compute_advantages(r, groups, name="drgrpo").tolist() == pytest.approx(expected_dr, abs=1e-6)
    # 1 of the 4 groups (the lone row 8) has all rewards equal
    assert advantages.group_metrics(r, groups)["reward/uniform_group_frac"].item() == 0.25


def _random_batch(seed=0, B=9, T=5):
    """A batch of 3 interleaved groups with ragged masks and every per-token input of grpo_loss."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g) * 3
    return {
        "rewards": torch.rand(B, generator=g), "group": torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2]),
        "mask": mask, "old": old, "logp": old + 0.3 * torch.randn(B, T, generator=g),
        "ref": old + 0.2 * torch.randn(B, T, generator=g), "rollout": old + 0.5 * torch.randn(B, T, generator=g),
        "ent": torch.rand(B, T, generator=g)}


SHUFFLE_CONFIGS = [
    LossConfig(kl_coef=0.1, entropy_coef=0.01),
    LossConfig(aggregation="seq-mean-token-mean", correction="tis", dual_clip_c=3.0, kl_coef=0.1),
    LossConfig(correction="masked_is_token", is_band_low=0.7, is_band_high=1.4),
    LossConfig(policy_loss="gspo", aggregation="seq-mean-token-mean", correction="masked_is_seq",
               gspo_clip_eps_low=0.05, gspo_clip_eps_high=0.05, is_band_low=0.9, is_band_high=1.1),
]


@pytest.mark.parametrize("cfg", SHUFFLE_CONFIGS, ids=["grpo", "grpo-tis-seqmean", "masked-token", "gspo-masked-seq"])
@pytest.mark.parametrize("name", sorted(advantages.ADVANTAGES))
def test_shuffled_batch_gives_permuted_advantages_and_same_loss(cfg, name):
    """Rows (samples with their group ids, masks and log-probs) permuted: advantages permute with them
    and loss, metrics and gradients are unchanged. Equal within fp32 rounding, not bitwise: group sums
    and the loss's token sums add the same numbers in another order, and fp32 addition is not associative."""
    b = _random_batch()
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))

    def run(rows):
        adv = compute_advantages(b["rewards"][rows], b["group"][rows], name=name)
        logp = b["logp"][rows].clone().requires_grad_()
        loss, m = grpo_loss(cfg, logp_BT=logp, old_logp_BT=b["old"][rows], adv_B=adv, mask_BT=b["mask"][rows],
                            ref_logp_BT=b["ref"][rows], rollout_logp_BT=b["rollout"][rows], entropy_BT=b["ent"][rows])
        loss.backward()
        return adv, loss, m, logp.grad

    adv, loss, m, grad = run(torch.arange(9))
    adv_p, loss_p, m_p, grad_p = run(perm)
    assert adv.abs().max() > 0.1 and grad.abs().max() > 0  # the test has something to compare
    torch.testing.assert_close(adv_p, adv[perm], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_p, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_p, grad[perm], rtol=1e-5, atol=1e-8)
    for key in m:
        torch.testing.assert_close(m_p[key], m[key], rtol=1e-6, atol=1e-7, msg=key)


def test_advantage_errors_name_the_problem():
    with pytest.raises(ValueError, match="one integer group id per response"):
        compute_advantages(torch.ones(6), adjacent(2, 4))
    with pytest.raises(ValueError, match="dtype torch.float32"):
        compute_advantages(torch.ones(4), torch.zeros(4))
    with pytest.raises(TypeError, match="not a group size"):
        compute_advantages(torch.ones(8), 4)
    with pytest.raises(KeyError, match="drgrpo"):
        compute_advantages(torch.ones(4), adjacent(1, 4), name="nope")


# -- PPO clip ---------------------------------------------------------------------------------
def _one(x):
    return torch.tensor([[x]], dtype=torch.float64)


@pytest.mark.parametrize(
    "adv, ratio, eps_low, eps_high, dual, expected_loss, clip_high, clip_low, dual_active",
    [
        (1.0, 1.5, 0.2, 0.2, None, -1.2, True, False, False),     # A>0, ratio above 1+eps: clipped
        (1.0, 1.1, 0.2, 0.2, None, -1.1, False, False, False),    # inside the trust region
        (1.0, 1.25, 0.2, 0.28, None, -1.25, False, False, False),  # clip-higher lets 1.25 through
        (1.0, 1.25, 0.2, 0.2, None, -1.2, True, False, False),    # ... symmetric clip does not
        (1.0, 0.5, 0.2, 0.2, None, -0.5, False, False, False),    # A>0, low ratio: unclipped branch
        (-1.0, 0.5, 0.2, 0.2, None, 0.8, False, True, False),     # A<0, ratio below 1-eps: clipped
        (-1.0, 2.0, 0.2, 0.2, None, 2.0, False, False, False),    # A<0, big ratio: unbounded ...
        (-1.0, 4.0, 0.2, 0.2, 3.0, 3.0, False, False, True),      # ... unless dual clip caps at c
        (-2.0, 2.0, 0.2, 0.2, 3.0, 4.0, False, False, False),     # dual clip inactive below c
        (2.0, 4.0, 0.2, 0.2, 3.0, -2.4, True, False, False),      # dual clip ignores A>0
    ],
)
def test_ppo_clip_hand_values(adv, ratio, eps_low, eps_high, dual, expected_loss, clip_high, clip_low, dual_active):
    logp = _one(LOG(ratio)).requires_grad_()
    loss, facts = ppo_clip_loss(logp, _one(0.0), _one(adv), eps_low, eps_high, dual)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert (facts["clip_high"].item(), facts["clip_low"].item(), facts["dual_clip"].item()) == (
        clip_high, clip_low, dual_active)
    loss.sum().backward()
    # d(-A ratio)/d logp = -A ratio when the unclipped branch is active; 0 when any clip is
    active = not (clip_high or clip_low or dual_active)
    assert logp.grad.item() == pytest.approx(-adv * ratio if active else 0.0, abs=1e-12)


def test_log_ratio_is_clamped_before_exp():
    loss, facts = ppo_clip_loss(_one(1000.0), _one(0.0), _one(-1.0), 0.2, 0.2, None, log_ratio_clamp=20.0)
    assert torch.isfinite(loss).all()
    assert facts["ratio"].item() == pytest.approx(math.exp(20.0))


# -- KL -----------------------------------------------------------------------------------------
def test_kl_estimators_hand_values():
    logp, ref = _one(LOG(0.5)), _one(LOG(0.25))   # log ratio logp - ref = log 2
    l2 = LOG(2.0)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(l2)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * l2 * l2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + l2 - 1.0)  # exp(-lr) + lr - 1


def test_kl_estimates_are_clamped():
    assert kl_penalty(_one(0.0), _one(-50.0), "k1", kl_clamp=10.0).item() == 10.0
    assert kl_penalty(_one(-50.0), _one(0.0), "k3", log_ratio_clamp=20.0, kl_clamp=10.0).item() == 10.0
    assert kl_penalty(_one(-50.0), _one(0.0), "k1", kl_clamp=10.0).item() == -10.0


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    # Independent peer: the exact KL(p || q) of two categoricals vs Monte-Carlo estimates.
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[x].view(1, -1), q.log()[x].view(1, -1)
    for name in ("k1", "k3"):
        assert kl_penalty(logp, logq, name).mean().item() == pytest.approx(exact, abs=3e-3)
    assert (kl_penalty(logp, logq, "k3") >= 0).all() and (kl_penalty(logp, logq, "k2") >= 0).all()


# -- aggregation -------------------------------------------------------------------------------
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
M = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("name, expected", [
    ("token-mean", 10 / 4),               # all tokens weigh the same
    ("seq-mean-token-mean", (2 + 4) / 2),  # each sequence weighs the same
    ("seq-mean-token-sum", (6 + 4) / 2),
    ("seq-mean-token-sum-norm", 10 / (2 * 3)),  # constant length T = 3
])
def test_aggregation_hand_values(name, expected):
    assert aggregate(X, M, name).item() == pytest.approx(expected)


def test_aggregation_norm_len_and_global_counts():
    assert aggregate(X, M, "seq-mean-token-sum-norm", norm_len=5).item() == pytest.approx(10 / 10)
    # Splitting the batch into micro-batches with global counts adds up to the full-batch value.
    for name in grpo.AGGREGATIONS:
        full = aggregate(X, M, name)
        parts = sum(aggregate(X[i:i + 1], M[i:i + 1], name, num_tokens=4, num_seqs=2, norm_len=3) for i in range(2))
        assert parts.item() == pytest.approx(full.item()), name


def test_aggregation_ignores_nan_in_padding():
    bad = X.clone()
    bad[1, 1:] = float("nan")
    for name in grpo.AGGREGATIONS:
        assert aggregate(bad, M, name).item() == pytest.approx(aggregate(X, M, name).item())


# -- entropy and log-probs ----------------------------------------------------------------------
def test_entropy_from_logits_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g) * 3
    ref = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(grpo.entropy_from_logits(logits), ref, atol=1e-5)
    assert grpo.entropy_from_logits(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8), abs=1e-6)


def test_logprobs_from_logits_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=g)
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    ref = torch.distributions.Categorical(logits=logits).log_prob(tokens)
    assert torch.allclose(grpo.logprobs_from_logits(logits, tokens), ref, atol=1e-6)


# -- truncated IS and mismatch ---------------------------------------------------------------------
def test_truncated_is_weights_hand_values():
    old = torch.tensor([[LOG(0.5), LOG(0.9), LOG(0.2)]])
    rollout = torch.tensor([[LOG(0.25), LOG(0.9), LOG(0.4)]])
    w = corrections.truncated_is_weights(old, rollout, cap=1.5)
    assert w.tolist()[0] == pytest.approx([1.5, 1.0, 0.5])  # 2.0 truncated to 1.5


def test_mismatch_metrics_hand_values():
    old = torch.tensor([[LOG(0.5), LOG(0.5), 0.0]])
    rollout = torch.tensor([[LOG(0.25), LOG(0.5), -99.0]])  # last token is padding
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    m = grpo.mismatch_metrics(old, rollout, mask)
    l2 = LOG(2.0)
    assert m["mismatch/kl_k1"].item() == pytest.approx(-l2 / 2)
    assert m["mismatch/kl_k3"].item() == pytest.approx((2.0 - l2 - 1.0) / 2)  # exp(d) - d - 1, d = log 2
    assert m["mismatch/abs_diff_mean"].item() == pytest.approx(l2 / 2)
    assert m["mismatch/abs_diff_max"].item() == pytest.approx(l2)


# -- grpo_loss ---------------------------------------------------------------------------------------
def _batch():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([0.5, -1.5])
    return logp, mask, adv


def test_ratio_one_no_clip_gives_minus_mean_advantage():
    logp, mask, adv = _batch()
    # token-mean: every token of response i carries A_i -> -(3*0.5 + 2*(-1.5)) / 5
    loss, metrics = grpo_loss(LossConfig(), logp_BT=logp, adv_B=adv, mask_BT=mask)
    assert loss.item() == pytest.approx(-(3 * 0.5 + 2 * -1.5) / 5)
    # seq-mean-token-mean: -mean_i A_i
    loss2, _ = grpo_loss(LossConfig(aggregation="seq-mean-token-mean"), logp_BT=logp, adv_B=adv, mask_BT=mask)
    assert loss2.item() == pytest.approx(-(0.5 - 1.5) / 2)
    assert loss.item() != pytest.approx(loss2.item())  # they differ as defined
    assert metrics["clip_frac"].item() == 0 and metrics["ratio_mean"].item() == 1.0
    assert metrics["approx_kl"].item() == 0.0
    loss.backward()
    # d loss / d logp_t = -A_i / N_tok on real tokens, exactly 0 on padding
    expected = torch.tensor([[-0.5 / 5] * 3, [1.5 / 5, 1.5 / 5, 0.0]])
    assert torch.allclose(logp.grad, expected)


def test_masks_exclude_padding_exactly():
    logp, mask, adv = _batch()
    ref = torch.tensor([[-1.2, -1.0, -0.4], [-0.2, -0.9, 0.0]])
    old = torch.tensor([[-1.1, -2.1, -0.4], [-0.2, -0.6, 0.0]])
    rollout = old - 0.05
    ent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    cfg = LossConfig(kl_coef=0.1, entropy_coef=0.01, correction="tis", tis_cap=2.0, dual_clip_c=3.0)
    kw = dict(adv_B=adv, mask_BT=mask)

    def run(logp_, old_, ref_, roll_, ent_):
        return grpo_loss(cfg, logp_BT=logp_, old_logp_BT=old_, ref_logp_BT=ref_, rollout_logp_BT=roll_,
                         entropy_BT=ent_, **kw)

    clean, m_clean = run(logp, old, ref, rollout, ent)
    poison = lambda t, v: torch.where(mask, t, torch.full_like(t, v))  # noqa: E731
    logp2 = poison(logp.detach(), 1e4).requires_grad_()
    dirty, m_dirty = run(logp2, poison(old, -1e4), poison(ref, float("inf")), poison(rollout, float("nan")),
                         poison(ent, float("nan")))
    assert dirty.item() == pytest.approx(clean.item())
    for key in m_clean:
        assert m_dirty[key].item() == pytest.approx(m_clean[key].item()), key
    dirty.backward()
    assert torch.isfinite(logp2.grad).all() and logp2.grad[1, 2].item() == 0.0


def test_grpo_loss_hand_value_with_kl_entropy_and_tis():
    logp = torch.tensor([[LOG(0.5), LOG(0.5)]])
    old = torch.tensor([[LOG(0.5), LOG(0.25)]])        # ratios 1 and 2 (A > 0: second clipped at 1.2)
    ref = torch.tensor([[LOG(0.25), LOG(0.5)]])        # lr = log 2 and 0
    rollout = torch.tensor([[LOG(0.25), LOG(0.25)]])   # IS weights 2 -> capped 1.5, and 1
    ent = torch.tensor([[0.3, 0.7]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    cfg = LossConfig(kl_coef=0.5, kl_estimator="k3", entropy_coef=0.1, correction="tis", tis_cap=1.5)
    loss, m = grpo_loss(cfg, logp_BT=logp, old_logp_BT=old, adv_B=torch.tensor([1.0]), mask_BT=mask,
                        ref_logp_BT=ref, rollout_logp_BT=rollout, entropy_BT=ent)
    pg = (-1.0 * 1.5 + -1.2 * 1.0) / 2
    kl = (0.5 + LOG(2) - 1.0 + 0.0) / 2
    assert m["pg_loss"].item() == pytest.approx(pg)
    assert m["kl"].item() == pytest.approx(kl)
    assert m["entropy"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(pg + 0.5 * kl - 0.1 * 0.5)
    assert m["clip_frac"].item() == 0.5 and m["clip_frac_high"].item() == 0.5
    assert m["tis/truncated_frac"].item() == 0.5 and m["tis/weight_mean"].item() == pytest.approx(1.25)


def test_kl_is_logged_but_not_added_when_coef_is_zero():
    logp, mask, adv = _batch()
    ref = logp.detach() - 1.0
    base, _ = grpo_loss(LossConfig(), logp_BT=logp, adv_B=adv, mask_BT=mask)
    loss, m = grpo_loss(LossConfig(kl_coef=0.0), logp_BT=logp, adv_B=adv, mask_BT=mask, ref_logp_BT=ref)
    assert loss.item() == base.item() and m["kl"].item() > 0


def test_config_and_input_errors():
    logp, mask, adv = _batch()
    with pytest.raises(KeyError, match="k3"):
        LossConfig(kl_estimator="k4")
    with pytest.raises(KeyError, match="token-mean"):
        LossConfig(aggregation="sum")
    with pytest.raises(ValueError, match="dual_clip_c"):
        LossConfig(dual_clip_c=0.5)
    with pytest.raises(ValueError, match="ref_logp_BT"):
        grpo_loss(LossConfig(kl_coef=0.1), logp_BT=logp, adv_B=adv, mask_BT=mask)
    with pytest.raises(ValueError, match="old_logp_BT has shape"):
        grpo_loss(LossConfig(), logp_BT=logp, old_logp_BT=logp[:, :2], adv_B=adv, mask_BT=mask)
    with pytest.raises(ValueError, match="one advantage per response"):
        grpo_loss(LossConfig(), logp_BT=logp, adv_B=torch.ones(3), mask_BT=mask)
    with pytest.raises(Exception):
        LossConfig().kl_coef = 1.0  # frozen
