"""rl.policy: per-token log-probs and entropies against transformers (an independent implementation),
and one GRPO update at CP=2 / TP=2 / DP=2 (torchrun, 2 ranks) against the same update in one
process: same log-probs, entropies, loss, grad norm, and the same log-probs after the AdamW step
(the equivalence check ChatLearn publishes for context parallelism on Moonlight). Dense Qwen2, and
DeepSeek-V3 (MLA, MoE with shared experts and expert bias) at CP=2 and EP=2 x DP=2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convert import hf2mcore
from runtime import megatron as rt
from rl.grpo import entropy_from_logits, logprobs_from_logits
from tools.make_tiny import cached_tiny
from runtime.net import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests/workers/policy_layouts.py"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            hf = cached_tiny(family, "fp32")
            out = tmp_path_factory.mktemp(family) / "mcore"
            hf2mcore.run(str(hf), str(out))
            cache[family] = (hf, out)
        return cache[family]
    return get


@pytest.fixture(scope="module")
def qwen2(converted):
    return converted("qwen2")


def _worker(model, out: Path, nproc: int, **layout) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), str(WORKER), "--model", str(model), "--out", str(out)]
    cmd += [f"--{k}={v}" for k, v in layout.items()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out)


def test_logprobs_and_entropy_match_transformers(qwen2):
    from transformers import AutoModelForCausalLM

    from rl.config import ModelSection
    from rl.policy import Policy

    hf, mcore = qwen2
    rt.init_local()
    policy = Policy(mcore, ModelSection())
    g = torch.Generator().manual_seed(1)
    lengths_B = torch.tensor([19, 11, 16])
    tokens_BS = torch.randint(5, policy.m.vocab_size, (3, 19), generator=g)
    for b, n in enumerate(lengths_B.tolist()):
        tokens_BS[b, n:] = 0
    logp_BT, ent_BT = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=2, with_entropy=True)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    for b, n in enumerate(lengths_B.tolist()):
        with torch.no_grad():
            logits = model(tokens_BS[b: b + 1, :n]).logits[0, :-1]
        ref_logp = logprobs_from_logits(logits, tokens_BS[b, 1:n])
        torch.testing.assert_close(logp_BT[b, : n - 1], ref_logp, atol=2e-5, rtol=0)
        torch.testing.assert_close(ent_BT[b, : n - 1], entropy_from_logits(logits), atol=2e-5, rtol=0)
        assert (logp_BT[b, n - 1:] == 0).all()  # positions past the row's end are left at 0


@pytest.fixture(scope="module")
def reference(converted, tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _worker(converted(family)[1], tmp_path_factory.mktemp("ref") / "ref.pt", 1)
        return cache[family]
    return get


LAYOUTS = [("qwen2", {"cp": 2}), ("qwen2", {"tp": 2}), ("qwen2", {"dp": 2}),
           pytest.param("deepseek_v3", {"cp": 2}, marks=pytest.mark.slow),
           pytest.param("deepseek_v3", {"ep": 2, "dp": 2}, marks=pytest.mark.slow)]


@pytest.mark.multiproc
@pytest.mark.parametrize("family,layout", LAYOUTS, ids=["qwen2-cp2", "qwen2-tp2", "qwen2-dp2", "dsv3-cp2", "dsv3-ep2"])
def test_update_equivalent_across_layouts(converted, reference, family, layout, tmp_path):
    reference = reference(family)
    got = _worker(converted(family)[1], tmp_path / "got.pt", 2, **layout)
    mask = reference["mask"]
    torch.testing.assert_close(got["logp"][mask], reference["logp"][mask], atol=2e-5, rtol=0)
    torch.testing.assert_close(got["entropy"][mask], reference["entropy"][mask], atol=2e-5, rtol=0)
    for key in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm"):
        assert got["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-4, abs=1e-6), key
    assert reference["metrics"]["clip_frac"] > 0  # the batch exercises clipping, not only ratio 1
    moved = (reference["after"][mask] - reference["logp"][mask]).abs().max()
    assert moved > 1e-3  # the step changed the policy ...
    torch.testing.assert_close(got["after"][mask], reference["after"][mask], atol=1e-4, rtol=0)  # ... identically
