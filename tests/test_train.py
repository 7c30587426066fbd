"""rl/train.py end to end on a fabricated 2-layer Qwen2.

Fast (in process, transformers engine): the loop trains, checkpoints, resumes with metrics equal to
the uninterrupted run's, exports HF weights equal to what the live sync put into the engine, and
counts reward errors. Marked: the contract command on vLLM + Ray from nothing (< 5 min, metrics
keys), resume equality on vLLM + Ray, and a killed rollout actor restarting from the checkpoint.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rl.batch import PromptStream, build_batch
from rl.config import load_config
from rl.metrics import REQUIRED, read
from rl.reward import REWARDS
from rl.rollout.base import Sample

from rl_helpers import TINY, tiny_policy

ROOT = Path(__file__).resolve().parents[1]


def _parity_or_raise(response: str, ground_truth: str) -> float:
    """A reward a random model earns half the time (so advantages are not all zero); raises on some."""
    if len(response) % 7 == 3:
        raise ValueError("deliberate scoring failure")
    return float(len(response) % 2 == 0)


REWARDS["test_parity"] = _parity_or_raise


def _cfg(run_dir, model_dir, *extra):
    return load_config(TINY, [f"run.dir={run_dir}", f"model.path={model_dir}", "run.reward=test_parity",
                              "optim.lr=1e-4", "loss.kl_coef=0.01", *extra])


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("timing/", "perf/"))}


def train_cli(config: Path, run: Path, *overrides: str, model: Path | None = None, timeout: int = 900) -> float:
    """``python rl/train.py --config CONFIG run.dir=RUN model.path=MODEL OVERRIDES`` in a fresh process, as a
    user runs it (from RUN's parent, nothing of this repository on PYTHONPATH; MODEL defaults to RUN/model,
    fabricated there): its wall time in seconds."""
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "rl/train.py"), "--config", str(config), f"run.dir={run}",
                        f"model.path={model or run / 'model'}", *overrides], capture_output=True, text=True,
                       timeout=timeout, cwd=run.parent, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return time.time() - t0



# ------------------------------------------------------------------------------ units
def test_config_yaml_overrides_and_errors(capsys, tmp_path):
    cfg = load_config(TINY, ["run.steps=7", "optim.lr=3e-6", "optim.betas=[0.9, 0.95]", "model.etp=null"])
    assert (cfg.run.steps, cfg.optim.lr, cfg.optim.betas, cfg.model.etp) == (7, 3e-6, (0.9, 0.95), None)
    assert cfg.model.moe_router_load_balancing_type == "none" and cfg.model.moe_aux_loss_coeff == 0.0
    assert cfg.model.moe_router_bias_update_rate == 0.0
    with pytest.raises(ValueError, match="no field 'stepz'.*steps"):
        load_config(TINY, ["run.stepz=3"])
    with pytest.raises(ValueError, match="RunSection.steps: expected int"):
        load_config(TINY, ["run.steps=many"])
    with pytest.raises(ValueError, match="rollout.engine='sglang'"):
        load_config(TINY, ["rollout.engine=sglang"])
    from rl.metrics import MetricsLog

    wandb_cfg = load_config(TINY, ["logging.wandb=offline"]).logging
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="wandb package, which is not installed"):
            MetricsLog(tmp_path, wandb_cfg)
    from rl.train import main

    main(["--help-config"])
    assert "loss.kl_coef=0.0" in capsys.readouterr().out


def test_prompt_stream_position_resumes():
    a = PromptStream(10, seed=3)
    first = a.take(7) + a.take(7)  # crosses into epoch 1
    assert sorted(first[:10]) == list(range(10))  # an epoch is a permutation
    b = PromptStream(10, seed=3)
    b.take(7)
    c = PromptStream(10, seed=3)
    c.load_state_dict(b.state_dict())
    assert c.take(7) == first[7:]


def test_build_batch_masks_response_positions():
    samples = [[Sample((7, 8), (-0.5, -0.25), "stop"), Sample((9,), (-1.0,), "length")]]
    batch = build_batch([(1, 2, 3)], samples)
    assert batch["tokens_BS"].tolist() == [[1, 2, 3, 7, 8], [1, 2, 3, 9, 0]]
    assert batch["lengths_B"].tolist() == [5, 4]
    # position t predicts token t + 1: the response starts at index 3, predicted from position 2
    assert batch["mask_BT"].tolist() == [[False, False, True, True], [False, False, True, False]]
    assert batch["rollout_logp_BT"].tolist() == [[0, 0, -0.5, -0.25], [0, 0, -1.0, 0]]


def test_prefill_chunks_bound_tokens():
    from rl.batch import Prompt
    from rl.collect import prefill_chunks

    prompts = [Prompt(tuple(range(n)), "0") for n in (5, 5, 5, 20, 1)]
    chunks = list(prefill_chunks(prompts, n=4, budget=40))
    assert [[len(p.ids) for p in c] for c in chunks] == [[5, 5], [5], [20], [1]]


# ------------------------------------------------------------------------------ the loop
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("train"))


def test_loop_resume_export_and_reward_errors(model_dir, tmp_path, capsys):
    from rl.train import train

    local = ["rollout.engine=transformers", "ray.enabled=false"]
    snapshot = {}

    def grab_engine(step, cluster):
        if step == 4:
            snapshot.update({k: v.detach().clone() for k, v in cluster.engine.params.items()})

    full = read(train(_cfg(tmp_path / "a", model_dir, *local), hook=grab_engine))
    train(_cfg(tmp_path / "b", model_dir, *local, "run.stop_at=2"))
    assert [r["step"] for r in read(tmp_path / "b/metrics.jsonl")] == [0, 1, 2]
    resumed = read(train(_cfg(tmp_path / "b", model_dir, *local, "run.resume=true")))
    assert [r["step"] for r in full] == [0, 1, 2, 3, 4] == [r["step"] for r in resumed]
    for row in full[1:]:
        assert set(REQUIRED) <= set(row) and all(row[k] is not None for k in REQUIRED), row
    assert [_comparable(r) for r in resumed] == [_comparable(r) for r in full]
    assert all(r["actor/grad_norm"] > 0 for r in full[1:])  # advantages were not all zero
    assert full[-1]["actor/kl"] > 0  # the policy moved away from the reference
    assert sum(r["reward/errors"] for r in full[1:]) > 0
    assert "samples raised while being scored" in capsys.readouterr().err

    from safetensors.torch import load_file

    exported = {}
    for f in sorted((tmp_path / "a/hf").glob("*.safetensors")):
        exported.update(load_file(f))
    assert set(exported) == set(snapshot)
    for name, t in exported.items():  # mcore2hf of the final policy == what the live sync sent
        assert torch.equal(t, snapshot[name]), name
    start = load_file(next((model_dir.parent / "model_hf").glob("*.safetensors")))
    name = next(n for n in start if n.endswith("mlp.down_proj.weight"))
    assert not torch.equal(start[name], exported[name])  # training changed the weights


# ------------------------------------------------------------------------------ Ray / vLLM
@pytest.mark.ray
def test_dead_rollout_actor_restarts_from_checkpoint(model_dir, tmp_path, capsys):
    import ray

    from rl.train import train

    killed = []

    def kill_engine(step, cluster):
        if step == 3 and not killed:
            killed.append(step)
            ray.kill(cluster.engine_handle)

    cfg = _cfg(tmp_path / "run", model_dir, "rollout.engine=transformers", "ray.num_cpus=2")
    rows = read(train(cfg, hook=kill_engine))
    assert killed == [3]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "a Ray actor died" in err and "restarting from the last checkpoint" in err


@pytest.mark.ray
def test_ray_tp2_trainer_matches_one_process(model_dir, tmp_path):
    """Two trainer actors at TP=2 (gloo group, sync gathered to rank 0, engine in its own actor) against
    the single-process run: same metrics, same exported weights."""
    from safetensors.torch import load_file

    from rl.train import train

    common = ["rollout.engine=transformers", "run.steps=2", "run.checkpoint_every=0", "run.eval_every=0"]
    one = read(train(_cfg(tmp_path / "one", model_dir, *common, "ray.enabled=false")))
    two = read(train(_cfg(tmp_path / "two", model_dir, *common, "model.tp=2", "ray.num_cpus=2")))
    for a, b in zip(one, two):
        assert a["reward/mean"] == b["reward/mean"]
        for key in ("actor/pg_loss", "actor/kl", "actor/entropy", "actor/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    w1, w2 = (load_file(next((tmp_path / d / "hf").glob("*.safetensors"))) for d in ("one", "two"))
    assert set(w1) == set(w2)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=0)


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_tiny_config_from_nothing(tmp_path):
    run = tmp_path / "run"
    elapsed = train_cli(TINY, run, timeout=600)
    print(f"tiny.yaml from nothing: {elapsed:.0f} s")  # a figure for the README, not a test of speed
    rows = read(run / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    for row in rows[1:]:
        assert set(REQUIRED) <= set(row) and all(row[k] is not None for k in REQUIRED), row
        assert row["mismatch/logprob_abs_diff_mean"] < 1e-3  # vLLM and MCore agree on the sampled tokens
    assert (run / "checkpoints/latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (run / "hf/config.json").is_file() and (run / "curves.png").is_file()
    assert any((run / "tensorboard").iterdir())


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_resume_reproduces_metrics_vllm_ray(model_dir, tmp_path):
    from rl.train import train

    full = read(train(_cfg(tmp_path / "a", model_dir, "run.export_hf=false")))
    train(_cfg(tmp_path / "b", model_dir, "run.export_hf=false", "run.stop_at=2"))
    resumed = read(train(_cfg(tmp_path / "b", model_dir, "run.export_hf=false", "run.resume=true")))
    assert [_comparable(r) for r in resumed] == [_comparable(r) for r in full]
    assert all(r["actor/grad_norm"] > 0 for r in full[1:])


@pytest.fixture(scope="module")
def tiny_moe_run(tmp_path_factory):
    """rl/configs/tiny_moe.yaml run from nothing (fabrication, warm-up, conversion; its first 20 steps, the
    first held-out evaluation after step 0): (run dir, seconds). Its converted model is reused by the tiny_pp
    run (same fabrication settings)."""
    tmp = tmp_path_factory.mktemp("tiny_moe")
    run = tmp / "run"
    return run, train_cli(ROOT / "rl/configs/tiny_moe.yaml", run, "run.steps=20")


def _evals(rows: list[dict]) -> list[tuple[int, float]]:
    return [(row["step"], row["eval/accuracy"]) for row in rows if row.get("eval/accuracy") is not None]


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_tiny_moe_config_from_nothing_learns(tiny_moe_run):
    """rl/configs/tiny_moe.yaml (a fabricated, warmed-up Qwen3-MoE with routing replay, masked IS,
    one-step-ahead generation, dynamic sampling, overlong filtering and packing) end to end, its first 20
    steps: held-out greedy accuracy after step 20 above the one before step 1 (its wall time is printed, not
    tested)."""
    run, elapsed = tiny_moe_run
    rows = read(run / "metrics.jsonl")
    evals = _evals(rows)
    print(f"tiny_moe: {elapsed:.0f} s, held-out accuracy {evals}")  # time: a figure, not a test
    assert evals[0][0] == 0 and evals[-1][0] == rows[-1]["step"] == 20 and evals[-1][1] > evals[0][1], evals
    for row in rows[1:]:  # actor/kl: no reference model (run.log_kl=false, loss.kl_coef=0)
        assert set(REQUIRED) <= set(row) and all(row[k] is not None for k in REQUIRED if k != "actor/kl"), row
        assert row["train/staleness_max"] <= 1 and row["train/pad_frac"] == 0.0
        assert 0.0 < row["routing/replay_agreement"] <= 1.0 and row["mismatch/masked_frac"] is not None
    assert [row["train/staleness_max"] for row in rows[1:3]] == [0, 1]
    assert all(row["timing/overlap_s"] > 0 for row in rows[1:-1])
    assert (run / "hf/config.json").is_file()


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_tiny_pp_config_learns_with_two_pipeline_stages(tiny_moe_run, tmp_path):
    """rl/configs/tiny_pp.yaml: the same warmed-up Qwen3-MoE (its fabrication settings are tiny_moe's, so
    its converted model is reused) trained by two pipeline-stage actors (1F1B, distributed optimizer,
    full recompute, packing, R3 replayed in the recomputed forwards): 20 steps raise held-out accuracy,
    every step's metrics are there, the sync from both stages keeps the engine on the policy (the first
    step's trainer/engine mismatch is fp32 noise), and the final policy exports."""
    run = tmp_path / "run"
    elapsed = train_cli(ROOT / "rl/configs/tiny_pp.yaml", run, model=tiny_moe_run[0] / "model")
    rows = read(run / "metrics.jsonl")
    evals = _evals(rows)
    print(f"tiny_pp: {elapsed:.0f} s, held-out accuracy {evals}")
    assert evals[0][0] == 0 and evals[-1][0] == rows[-1]["step"] == 20 and evals[-1][1] > evals[0][1], evals
    for row in rows[1:]:
        assert set(REQUIRED) <= set(row) and all(row[k] is not None for k in REQUIRED if k != "actor/kl"), row
        assert row["train/pad_frac"] == 0.0 and 0.0 < row["routing/replay_agreement"] <= 1.0
    assert rows[1]["mismatch/logprob_abs_diff_mean"] < 1e-5  # step 1 is on-policy: both sides fp32
    assert (run / "hf/config.json").is_file()


def lora_bytes(config: dict, rank: int) -> int:
    """fp32 bytes of rank-`rank` adapters on the seven linears of every layer of a dense HF config: A is
    [rank, in], B [out, rank] for each of q, k, v, o, gate, up, down."""
    h, i = config["hidden_size"], config["intermediate_size"]
    d = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    linears = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    return config["num_hidden_layers"] * rank * sum(a + b for a, b in linears) * 4


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_tiny_lora_config_from_nothing_learns(tmp_path):
    """rl/configs/tiny_lora.yaml from nothing (a fabricated, warmed-up 2-layer Qwen3; rank-8 adapters on its
    seven linears, the base frozen), its first 20 steps: held-out greedy accuracy after step 20 above the one
    before step 1; every step sends vLLM exactly the adapters' fp32 bytes, counted from the model's config
    (under 10% of the model's own); the run ends with a PEFT adapter directory of those tensors."""
    from safetensors import safe_open

    run = tmp_path / "run"
    elapsed = train_cli(ROOT / "rl/configs/tiny_lora.yaml", run, "run.steps=20")
    rows = read(run / "metrics.jsonl")
    evals = _evals(rows)
    print(f"tiny_lora: {elapsed:.0f} s, held-out accuracy {evals}")
    assert evals[0][0] == 0 and evals[-1][0] == rows[-1]["step"] == 20 and evals[-1][1] > evals[0][1], evals
    config = json.loads((run / "model_hf/config.json").read_text())
    adapters = lora_bytes(config, rank=8)
    with safe_open(run / "model_hf/model.safetensors", "pt") as f:
        model = sum(f.get_tensor(k).numel() for k in f.keys()) * 4
    assert adapters < 0.1 * model
    for row in rows[1:]:
        assert set(REQUIRED) <= set(row) and all(row[k] is not None for k in REQUIRED if k != "actor/kl"), row
        assert row["sync/bytes"] == adapters, (row["step"], row["sync/bytes"], adapters)
    peft = json.loads((run / "lora/adapter_config.json").read_text())
    assert peft["r"] == 8 and peft["peft_type"] == "LORA"
    with safe_open(run / "lora/adapter_model.safetensors", "pt") as f:
        assert sum(f.get_tensor(k).numel() for k in f.keys()) * 4 == adapters
