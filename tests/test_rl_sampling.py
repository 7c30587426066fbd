"""DAPO's data-side devices: dynamic sampling (rl.sampling) and overlong filtering / shaping
(rl.overlong), from scripted rollouts up to the trainer's loop.

Expected numbers are written by hand in each test, never computed by the code under test. The rollout
source is a fake whose rewards are scripted round by round; the loop test runs two in-process steps
(transformers engine, no Ray, no vLLM).
"""
from pathlib import Path

import pytest
import torch

from rl.batch import build_batch
from rl.config import describe, load_config
from rl.grpo import LossConfig, grpo_loss
from rl.overlong import RewardSection, loss_mask, overlong_penalty, shape_rewards, truncated
from rl.rollout.base import Sample
from rl.sampling import Round, SamplingSection, collect_groups

from rl_helpers import PARITY, TINY, tiny_policy

ROOT = Path(__file__).resolve().parents[1]


# -- dynamic sampling ------------------------------------------------------------------------------
class ScriptedSource:
    """draw(r) -> round r of `script`: one list of rewards per prompt (its group); prompts are named
    "r{round}p{index}" so a test can say exactly which groups were kept."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def __call__(self, r):
        self.calls.append(r)
        groups = self.script[r]
        samples = [[Sample((p, g), (-1.0, -1.0), "stop") for g in range(len(rs))] for p, rs in enumerate(groups)]
        rewards = torch.tensor([x for rs in groups for x in rs], dtype=torch.float32)
        return Round([f"r{r}p{p}" for p in range(len(groups))], samples, rewards, rewards.clone(), errors=r)


SCRIPT = [
    [[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]],        # round 0: p1, p3 kept; 2 equal
    [[0, 0, 0, 0], [1, 1, 1, 1], [0.5, 0.5, 0.5, 0.5], [1, 0, 1, 1]],  # round 1: p3 kept; 3 equal
    [[0, 0, 0], [0, 1, 1], [1], [1, 0], [1, 1, 0, 0]],                 # round 2: sizes differ; p1, p3, p4 kept,
]                                                                      # p0 and p2 (a group of one) equal


def _never_equal(got):
    rows = [len(s) for s in got.samples]
    for rewards in torch.split(got.rewards_B, rows):
        assert rewards.max() > rewards.min(), rewards


def test_dynamic_sampling_drops_equal_groups_and_samples_more_until_full():
    source = ScriptedSource(SCRIPT)
    got = collect_groups(source, groups=4, cfg=SamplingSection(dynamic=True, max_extra_rounds=5))
    assert source.calls == [0, 1, 2]  # stopped as soon as 4 groups were in
    # kept in order: r0p1, r0p3, r1p3, r2p1 (4 = the batch); r2p3 and r2p4 were kept but are surplus
    assert got.prompts == ["r0p1", "r0p3", "r1p3", "r2p1"]
    assert got.rewards_B.tolist() == [0, 1, 0, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 1, 1]
    assert [len(s) for s in got.samples] == [4, 4, 4, 3]
    assert got.metrics == {"data/groups_filtered": 2 + 3 + 2, "data/extra_rollout_rounds": 2,
                           "data/groups_short": 0, "data/groups_unused": 2}
    assert [r.errors for r in got.rounds] == [0, 1, 2]  # every round is reported, kept or not
    _never_equal(got)
    batch = build_batch([(1,)] * 4, got.samples)  # the batch's group ids follow the kept groups
    assert batch["group_B"].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 3


def test_groups_are_filtered_on_the_task_score_not_the_shaped_reward():
    """DAPO filters prompts whose accuracy is all 0 or all 1: an all-wrong group whose length-shaped
    rewards differ (overlong penalty) carries no task signal and is dropped all the same."""
    def draw(r):
        samples = [[Sample((p, g), (-1.0, -1.0), "stop") for g in range(2)] for p in range(2)]
        scores = torch.tensor([0.0, 0.0, 1.0, 0.0])              # p0: all wrong; p1: one right
        rewards = scores + torch.tensor([-0.5, 0.0, 0.0, -0.25])  # shaped: p0's rewards now differ
        return Round(["p0", "p1"], samples, rewards, scores, errors=0)

    got = collect_groups(draw, groups=1, cfg=SamplingSection(dynamic=True, max_extra_rounds=0))
    assert got.prompts == ["p1"] and got.metrics["data/groups_filtered"] == 1
    assert got.rewards_B.tolist() == [1.0, -0.25]  # the kept group trains on its shaped rewards


def test_dynamic_sampling_bound_trains_on_what_there_is():
    source = ScriptedSource(SCRIPT)
    got = collect_groups(source, groups=4, cfg=SamplingSection(dynamic=True, max_extra_rounds=1))
    assert source.calls == [0, 1]  # round 0 plus one extra round, then the bound
    assert got.prompts == ["r0p1", "r0p3", "r1p3"]
    assert got.metrics == {"data/groups_filtered": 5, "data/extra_rollout_rounds": 1,
                           "data/groups_short": 1, "data/groups_unused": 0}
    _never_equal(got)
    # The rows must split into mini-batches x data-parallel ranks: 3 groups x 4 rows = 12 rows do not
    # split into 8, so 2 groups (8 rows) are trained on and the third is unused.
    got = collect_groups(ScriptedSource(SCRIPT), groups=4, cfg=SamplingSection(dynamic=True, max_extra_rounds=1),
                         row_multiple=8)
    assert got.prompts == ["r0p1", "r0p3"]
    assert (got.metrics["data/groups_short"], got.metrics["data/groups_unused"]) == (2, 1)
    # max_extra_rounds=0 filters without sampling more
    got = collect_groups(ScriptedSource(SCRIPT), groups=4, cfg=SamplingSection(dynamic=True, max_extra_rounds=0))
    assert got.prompts == ["r0p1", "r0p3"] and got.metrics["data/extra_rollout_rounds"] == 0


def test_dynamic_sampling_with_nothing_to_learn_returns_no_groups():
    flat = [[[1, 1], [0, 0]]] * 3
    got = collect_groups(ScriptedSource(flat), groups=2, cfg=SamplingSection(dynamic=True, max_extra_rounds=2))
    assert got.prompts == [] and got.rewards_B.numel() == 0
    assert got.metrics == {"data/groups_filtered": 6, "data/extra_rollout_rounds": 2,
                           "data/groups_short": 2, "data/groups_unused": 0}


def test_without_dynamic_sampling_every_group_of_one_round_is_kept():
    source = ScriptedSource(SCRIPT)
    got = collect_groups(source, groups=4, cfg=SamplingSection(dynamic=False))
    assert source.calls == [0] and got.prompts == ["r0p0", "r0p1", "r0p2", "r0p3"]
    assert got.metrics == {"data/groups_filtered": 0, "data/extra_rollout_rounds": 0,
                           "data/groups_short": 0, "data/groups_unused": 0}


def test_groups_are_told_apart_by_reward_not_by_position():
    """Two adjacent groups whose rewards together vary but each alone are equal: both are dropped
    (a filter that looked at fixed-size windows of rows would keep a window spanning them)."""
    got = collect_groups(ScriptedSource([[[1, 1, 1], [0], [0, 0]], [[1, 0]]]), groups=1,
                         cfg=SamplingSection(dynamic=True, max_extra_rounds=1))
    assert got.prompts == ["r1p0"] and got.metrics["data/groups_filtered"] == 3


# -- overlong handling --------------------------------------------------------------------------------
def test_overlong_filter_masks_exactly_the_truncated_responses():
    samples = [[Sample((7, 8, 9), (-0.5,) * 3, "length"), Sample((9,), (-1.0,), "stop")],
               [Sample((5, 6), (-0.2, -0.3), "stop"), Sample((4, 4, 4), (-0.1,) * 3, "length")]]
    batch = build_batch([(1, 2), (3,)], samples)
    cut_B = truncated(samples)
    assert cut_B.tolist() == [True, False, False, True]
    mask = loss_mask(RewardSection(overlong="filter"), batch["mask_BT"], cut_B)
    assert mask.tolist() == [[False] * 4,                      # truncated: every position masked
                             [False, True, False, False],      # prompt (1, 2), response (9,)
                             [True, True, False, False],       # prompt (3,), response (5, 6)
                             [False] * 4]                      # truncated
    for mode in ("none", "shape"):  # the other modes leave the mask alone
        assert torch.equal(loss_mask(RewardSection(overlong=mode), batch["mask_BT"], cut_B), batch["mask_BT"])
    # Through the loss: masked rows get no gradient and do not count in the token mean (3 tokens remain).
    logp = torch.zeros(4, 4, requires_grad=True)
    loss, _ = grpo_loss(LossConfig(), logp_BT=logp, adv_B=torch.tensor([1.0, 2.0, -1.0, 5.0]), mask_BT=mask)
    assert loss.item() == pytest.approx((-2.0 + 1.0 + 1.0) / 3)
    loss.backward()
    assert logp.grad[0].tolist() == [0.0] * 4 and logp.grad[3].tolist() == [0.0] * 4


def test_overlong_shaping_matches_dapo_by_hand():
    # L_max = 20, L_cache = 5: no penalty up to 15 tokens, then -1/5 per token, -1 at 20
    lengths = torch.tensor([10, 15, 16, 18, 20])
    assert overlong_penalty(lengths, 20, 5, 1.0).tolist() == pytest.approx([0.0, 0.0, -0.2, -0.6, -1.0])
    assert overlong_penalty(lengths, 20, 5, 0.5).tolist() == pytest.approx([0.0, 0.0, -0.1, -0.3, -0.5])
    # DAPO's run: L_max = 20480, L_cache = 4096; 18432 tokens lie halfway into the buffer
    assert overlong_penalty(torch.tensor([16384, 18432, 20480]), 20480, 4096, 1.0).tolist() == [0.0, -0.5, -1.0]
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    shaped = shape_rewards(RewardSection(overlong="shape", overlong_buffer=5), rewards, lengths, 20)
    assert shaped.tolist() == pytest.approx([1.0, 0.0, 0.8, 0.4, -1.0])
    # default buffer: a fifth of max_tokens (4 of 20): 18 tokens are 2 into it -> -0.5
    assert shape_rewards(RewardSection(overlong="shape"), rewards[3:4], lengths[3:4], 20).tolist() == [0.5]
    assert torch.equal(shape_rewards(RewardSection(overlong="filter"), rewards, lengths, 20), rewards)


# -- configuration ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, match", [
    ("reward.overlong=truncate", "reward.overlong='truncate': choose one of none, filter, shape"),
    ("reward.overlong_buffer=0", "reward.overlong_buffer=0: must be >= 1"),
    ("reward.overlong_penalty=-1", "reward.overlong_penalty=-1.0: must be >= 0"),
    ("sampling.max_extra_rounds=-1", "sampling.max_extra_rounds=-1: must be >= 0"),
    ("sampling.dinamic=true", "SamplingSection has no field 'dinamic'"),
])
def test_bad_sampling_and_reward_configs_are_one_line_errors(override, match):
    with pytest.raises(ValueError, match=match) as err:
        load_config(TINY, [override])
    assert "\n" not in str(err.value)


def test_overlong_buffer_must_fit_in_the_length_limit():
    load_config(TINY, ["reward.overlong=shape", "reward.overlong_buffer=24"])  # tiny: rollout.max_tokens=24
    with pytest.raises(ValueError, match="reward.overlong_buffer=25 exceeds rollout.max_tokens=24"):
        load_config(TINY, ["reward.overlong=shape", "reward.overlong_buffer=25"])


def test_gpu_configs_turn_dapo_on_and_describe_lists_the_fields():
    for name in ("qwen3_gpu", "qwen3_30b_a3b", "moonlight_16b", "deepseek_v3_671b", "qwen3_235b_a22b"):
        cfg = load_config(ROOT / f"rl/configs/{name}.yaml")
        assert cfg.sampling.dynamic and cfg.reward.overlong == "shape", name
        assert 0 < cfg.reward.buffer(cfg.rollout.max_tokens) < cfg.rollout.max_tokens
    text = describe()
    for key in ("sampling.dynamic=False", "sampling.max_extra_rounds=3", "reward.overlong='none'",
                "reward.overlong_buffer=None", "reward.overlong_penalty=1.0", "model.packing=False"):
        assert key in text, key


# -- the loop ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("rl_sampling"))


def test_loop_with_dynamic_sampling_overlong_shaping_and_packing(model_dir, tmp_path):
    """The switches reach the loop: each step's filtered count equals its uniform groups over every
    round sampled (two independent computations), the batch is full or says how short it is, the
    overlong penalty shows in the rewards, packing computes no padding, and a run resumed from its
    checkpoint draws the same extra rounds (the prompt stream's position is saved after them)."""
    from rl.metrics import read
    from rl.train import train

    def cfg(run, *extra):
        return load_config(TINY, [
            f"run.dir={tmp_path / run}", f"model.path={model_dir}", f"run.reward={PARITY}",
            "rollout.engine=transformers", "ray.enabled=false", "run.steps=2", "run.eval_every=0",
            "run.checkpoint_every=1", "run.export_hf=false", "run.log_kl=false", "rollout.n=2",
            "sampling.dynamic=true", "sampling.max_extra_rounds=2", "reward.overlong=shape", "model.packing=true",
            *extra])

    rows = read(train(cfg("a")))
    assert [r["step"] for r in rows] == [1, 2]
    P = cfg("a").data.prompts_per_step
    for r in rows:
        sampled = (1 + r["data/extra_rollout_rounds"]) * P
        assert r["data/groups_filtered"] == round(r["reward/uniform_group_frac"] * sampled)
        assert r["data/groups_filtered"] > 0  # with G = 2 and a coin-flip reward about half the groups are equal
        trained = sampled - r["data/groups_filtered"] - r["data/groups_unused"]
        assert trained == P - r["data/groups_short"]
        assert r["train/pad_frac"] == 0.0 and r["actor/grad_norm"] > 0
        assert 0.0 <= r["response/overlong_frac"] <= 1.0
        assert r["reward/overlong_penalty_mean"] <= 0.0
    train(cfg("b", "run.stop_at=1"))
    resumed = read(train(cfg("b", "run.resume=true")))
    same = lambda row: {k: v for k, v in row.items() if not k.startswith(("timing/", "perf/"))}  # noqa: E731
    assert [same(r) for r in resumed] == [same(r) for r in rows]
