"""One-step off-policy generation (rl.pipeline, rollout.async_generation).

Fast: the real loop (rl.train.run) with a scripted engine and trainer (no Ray, no model): each step k
trains on samples the engine generated with policy version k - 2 (k - 1 for the first step) while it
generates the next batch, so the two overlap; an engine whose version stops advancing produces samples
older than the bound, which are dropped and never reach the trainer; drop_stale on scripted versions;
the bad configurations are one-line errors.
Marked ray: a real Ray run (transformers engine, 4 steps) records staleness 0 then 1 and overlaps
generation with training; a run stopped after step 2 and resumed continues bitwise (the batch sampled
ahead travels with the checkpoint); a rollout actor killed after step 3 restarts the run from the
checkpoint of step 2 and ends with the same metrics.
"""
import threading
import time

import pytest
import torch

from rl.config import load_config
from rl.metrics import read
from rl.pipeline import drop_stale
from rl.rollout.base import RolloutEngine, Sample
from rl.sampling import Collected

from rl_helpers import PARITY, TINY, tiny_policy

from test_train import _comparable




def collected(versions: list[list[int]]) -> Collected:
    samples = [[Sample((1, 2), (-0.1, -0.2), "stop", v) for v in group] for group in versions]
    n = sum(len(g) for g in versions)
    return Collected(prompts=list(range(len(versions))), samples=samples, rewards_B=torch.arange(n, dtype=torch.float32),
                     scores_B=torch.zeros(n), metrics={"data/groups_short": 0})


# ------------------------------------------------------------------------------ bound logic
def test_drop_stale_keeps_only_groups_within_the_bound():
    got, m = drop_stale(collected([[3, 3], [2, 2], [1, 2], [3, 2]]), trainer_version=3, max_staleness=1)
    assert got.prompts == [0, 1, 3] and got.rewards_B.tolist() == [0, 1, 2, 3, 6, 7]
    assert m["data/stale_groups_dropped"] == 1 and float(m["train/staleness_max"]) == 1.0
    assert float(m["train/staleness_mean"]) == pytest.approx(3 / 6)
    assert got.metrics["data/groups_short"] == 1
    got, _ = drop_stale(collected([[3, 3], [1, 1], [3, 3], [3, 3]]), 3, 1, row_multiple=4)
    assert got.prompts == [0, 2]  # three groups left, cut to rows that still split in 4
    got, m = drop_stale(collected([[0, 0]]), 5, None)
    assert got.prompts == [0] and float(m["train/staleness_max"]) == 5.0
    with pytest.raises(RuntimeError, match="policy version 4, newer than the trainer's 3"):
        drop_stale(collected([[4, 3]]), 3, 1)


def test_bad_async_configs_are_one_line_errors():
    base = ["rollout.async_generation=true", "ray.mode=disaggregated"]
    for extra, message in ((["rollout.max_staleness=0"], "max_staleness=0: samples generated one step ahead"),
                           (["ray.mode=colocated"], "ray.mode=colocated shares the GPU"),
                           (["ray.enabled=false"], "ray.enabled=false runs engine and trainer in one process")):
        with pytest.raises(ValueError, match=message) as err:
            load_config(TINY, base + extra)
        assert "\n" not in str(err.value)
    load_config(TINY, base)  # disaggregated with a bound of 1 is fine


# ------------------------------------------------------------------------------ the loop, scripted
class ScriptedEngine(RolloutEngine):
    """Samples whose first response token is 100 + the engine's weight version; takes `delay` s."""

    def __init__(self, delay: float, freeze_after: int | None = None):
        self.dtype, self.delay, self.freeze_after = torch.float32, delay, freeze_after
        self.busy = threading.Lock()

    def generate(self, prompts, sampling):
        with self.busy:  # one call at a time, as a Ray actor
            time.sleep(self.delay)
            return [[Sample((100 + self.weight_version, 7 + j), (-0.5, -0.5), "stop", self.weight_version)
                     for j in range(sampling.n)] for _ in prompts]

    def set_weight_version(self, version):
        if self.busy.locked():
            raise AssertionError("the weights changed while the engine was generating")
        if self.freeze_after is None or version <= self.freeze_after:
            super().set_weight_version(version)

    def prompt_logprobs(self, sequences):
        raise NotImplementedError

    def begin_weight_update(self, expected=None): ...

    def load_weights(self, bucket): ...

    def finish_weight_update(self): ...


class ScriptedCluster:
    """The trainer side of rl.actors.Cluster: its version is the last step synced (a step that trains on
    nothing keeps the weights but still counts); each sample's version is read from its tokens."""

    def __init__(self, engine, delay: float):
        self.engine, self.delay, self.version, self.trained = engine, delay, 0, []

    def trainers(self, method, *args):
        if method == "logprobs":
            return {"old_logp_BT": args[0]["rollout_logp_BT"].clone(), "ref_logp_BT": None}
        if method == "train":
            time.sleep(self.delay)
            batch = args[0]
            self.trained.append((self.version, [int(t) - 100 for t in batch["tokens_BS"][:, 3]]))
            n = int(batch["lengths_B"].sum())
            return [{"pg_loss": 0.0, "computed_positions": n, "padding_positions": 0}]
        if method == "sync_weights":
            assert args[0] in (self.version, self.version + 1)
            self.version = args[0]
            self.engine.set_weight_version(args[0])
            return None
        raise AssertionError(method)

    def shutdown(self):
        pass


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "x" * (1 + sum(ids) % 3)


def scripted_run(tmp_path, monkeypatch, engine, *extra):
    import rl.train
    from rl.batch import Prompt

    cluster = ScriptedCluster(engine, delay=0.3)
    monkeypatch.setattr(rl.train, "Cluster", lambda *a: cluster)
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "rollout.async_generation=true", "ray.mode=disaggregated",
                             "run.steps=5", "run.eval_every=0", "run.checkpoint_every=0", "run.export_hf=false",
                             f"run.reward={PARITY}", "logging.tensorboard=false", "logging.plot=false", *extra])
    prompts = [Prompt((1, 2, 3), "0") for _ in range(40)]
    rows = read(rl.train.run(cfg, tmp_path, tmp_path, _Tokenizer(), prompts, prompts[:2]))
    return cluster, rows


def test_loop_trains_each_step_on_the_previous_versions_samples_while_generating(tmp_path, monkeypatch):
    cluster, rows = scripted_run(tmp_path, monkeypatch, ScriptedEngine(delay=0.3))
    assert [v for v, _ in cluster.trained] == [0, 1, 2, 3, 4]  # the trainer's version at each step
    assert [sorted(set(s)) for _, s in cluster.trained] == [[0], [0], [1], [2], [3]]  # the samples' versions
    assert [r["train/staleness_max"] for r in rows] == [0, 1, 1, 1, 1]
    assert all(r["timing/overlap_s"] > 0.2 for r in rows[:-1])  # generation (0.3 s) ran during training (0.3 s)
    assert "timing/overlap_s" not in rows[-1] or rows[-1]["timing/overlap_s"] is None  # nothing left to generate
    assert rows[0]["timing/rollout_s"] > 0.25  # the first batch is sampled when the run starts ...
    assert all(r["timing/rollout_s"] < 0.1 for r in rows[1:])  # ... later ones are ready when their step begins
    assert all(r["data/stale_groups_dropped"] == 0 for r in rows)


def test_samples_older_than_the_bound_never_reach_the_trainer(tmp_path, monkeypatch):
    """An engine whose version stops at 1 (a broken update) keeps producing version-1 samples: from
    step 4 on (trainer at version 3) they are 2 versions old and dropped, whole groups."""
    cluster, rows = scripted_run(tmp_path, monkeypatch, ScriptedEngine(delay=0.05, freeze_after=1))
    assert all(v - s <= 1 for v, samples in cluster.trained for s in samples)
    assert [v for v, _ in cluster.trained] == [0, 1, 2]  # steps 4 and 5 trained on nothing
    assert [r["data/stale_groups_dropped"] for r in rows] == [0, 0, 0, 4, 4]
    assert rows[3]["data/groups_short"] == 4


# ------------------------------------------------------------------------------ Ray
ASYNC = ["rollout.engine=transformers", "ray.num_cpus=2", "ray.mode=disaggregated", "rollout.async_generation=true"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("async"))


def _cfg(run_dir, model_dir, *extra):
    return load_config(TINY, [f"run.dir={run_dir}", f"model.path={model_dir}", f"run.reward={PARITY}",
                              "optim.lr=1e-4", "loss.kl_coef=0.01", "run.export_hf=false", *ASYNC, *extra])


@pytest.fixture(scope="module")
def full_run(model_dir, tmp_path_factory):
    from rl.train import train

    return read(train(_cfg(tmp_path_factory.mktemp("full") / "run", model_dir)))


@pytest.mark.ray
def test_ray_async_records_staleness_and_overlaps(full_run):
    assert [r["step"] for r in full_run] == [0, 1, 2, 3, 4]
    steps = full_run[1:]
    assert [r["train/staleness_max"] for r in steps] == [0, 1, 1, 1]
    assert [r["train/staleness_mean"] for r in steps] == [0, 1, 1, 1]
    assert all(r["timing/overlap_s"] > 0 for r in steps[:-1])
    assert all(r["actor/grad_norm"] > 0 for r in steps)


@pytest.mark.ray
def test_ray_async_resume_is_bitwise(model_dir, full_run, tmp_path):
    from rl.train import train

    train(_cfg(tmp_path / "b", model_dir, "run.stop_at=2"))
    assert (tmp_path / "b/checkpoints/iter_0000002/rollout_ahead.pt").is_file()
    resumed = read(train(_cfg(tmp_path / "b", model_dir, "run.resume=true")))
    assert [_comparable(r) for r in resumed] == [_comparable(r) for r in full_run]


@pytest.mark.ray
def test_ray_async_dead_rollout_actor_restarts_from_checkpoint(model_dir, full_run, tmp_path, capsys):
    import ray

    from rl.train import train

    killed = []

    def kill_engine(step, cluster):
        if step == 3 and not killed:
            killed.append(step)
            ray.kill(cluster.engine_handle)

    rows = read(train(_cfg(tmp_path / "run", model_dir), hook=kill_engine))
    assert killed == [3]
    err = capsys.readouterr().err
    assert "a Ray actor died" in err and "restarting from the last checkpoint" in err
    assert [_comparable(r) for r in rows] == [_comparable(r) for r in full_run]
