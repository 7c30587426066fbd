"""rl.policy: per-token log-probs and entropies against transformers (an independent implementation),
and one GRPO update through Megatron-Core's stack at CP=2 / TP=2 / DP=2 / PP=2 / PP=2 x VPP=2 (torchrun,
2 ranks) against the same update in one process: same log-probs, entropies, loss, grad norm, the same
log-probs after the Adam step and the same weights (read back from a saved checkpoint by global key):
the equivalence check ChatLearn publishes for context parallelism on Moonlight. Dense Qwen2, and
DeepSeek-V3 (MLA, MoE with shared experts, expert bias, group routing) at CP=2, EP=2 x DP=2, TP=2, PP=2
with virtual stages and full recompute, PP=2 with an uneven first stage and selective recompute; and at
4 ranks PP=2 x EP=2 and PP=2 x TP=2 against PP=1 at the same world size."""
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


def _worker(model, out: Path, nproc: int, save: Path | None = None, **layout) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), str(WORKER), "--model", str(model), "--out", str(out)]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in layout.items()] + ([f"--save={save}"] if save else [])
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


def _weights(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a save_model checkpoint, read by global key (torch_dist metadata, no model)."""
    from convert.formats.torch_dist import Reader

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = Reader(root / "release")
    tensors = [k for k, md in reader.meta.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)]
    return {k: reader.read_region(k, (0,) * len(reader.tensor_meta(k).size), tuple(reader.tensor_meta(k).size))
            for k in tensors}


def _compare(got: dict, ref: dict) -> None:
    mask = ref["mask"]
    torch.testing.assert_close(got["logp"][mask], ref["logp"][mask], atol=2e-5, rtol=0)
    torch.testing.assert_close(got["entropy"][mask], ref["entropy"][mask], atol=2e-5, rtol=0)
    for key in ("loss", "pg_loss", "kl", "entropy", "clip_frac"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5, abs=1e-7), key
    assert got["metrics"]["grad_norm"] == pytest.approx(ref["metrics"]["grad_norm"], rel=1e-5)
    assert ref["metrics"]["clip_frac"] > 0  # the batch exercises clipping, not only ratio 1
    moved = (ref["after"][mask] - ref["logp"][mask]).abs().max()
    assert moved > 1e-3  # the step changed the policy ...
    torch.testing.assert_close(got["after"][mask], ref["after"][mask], atol=1e-4, rtol=0)  # ... identically


@pytest.fixture(scope="module")
def reference(converted, tmp_path_factory):
    cache = {}

    def get(family, nproc=1, **layout):
        key = (family, nproc, tuple(sorted(layout.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp("ref")
            cache[key] = _worker(converted(family)[1], d / "ref.pt", nproc, save=d / "weights", **layout)
            cache[key]["weights"] = _weights(d / "weights")
        return cache[key]
    return get


LAYOUTS = [("qwen2", {"cp": 2}), ("qwen2", {"tp": 2}), ("qwen2", {"dp": 2}), ("qwen2", {"pp": 2}),
           ("qwen2", {"pp": 2, "vpp": 2}),
           pytest.param("deepseek_v3", {"cp": 2}, marks=pytest.mark.slow),
           pytest.param("deepseek_v3", {"ep": 2, "dp": 2}, marks=pytest.mark.slow),
           pytest.param("deepseek_v3", {"tp": 2}, marks=pytest.mark.slow),
           pytest.param("deepseek_v3", {"pp": 2, "vpp": 2, "recompute": "full"}, marks=pytest.mark.slow),
           pytest.param("deepseek_v3", {"pp": 2, "pp_first": 1, "recompute": "selective"}, marks=pytest.mark.slow)]
IDS = ["qwen2-cp2", "qwen2-tp2", "qwen2-dp2", "qwen2-pp2", "qwen2-pp2-vpp2", "dsv3-cp2", "dsv3-ep2", "dsv3-tp2",
       "dsv3-pp2-vpp2-full-recompute", "dsv3-pp2-first1-selective-recompute"]


@pytest.mark.multiproc
@pytest.mark.parametrize("family,layout", LAYOUTS, ids=IDS)
def test_update_equivalent_across_layouts(converted, reference, family, layout, tmp_path):
    """Two ranks at `layout` against one process: same log-probs, loss, grad norm, updated policy."""
    ref = reference(family)
    got = _worker(converted(family)[1], tmp_path / "got.pt", 2, save=tmp_path / "weights", **layout)
    _compare(got, ref)
    _same_weights(_weights(tmp_path / "weights"), ref["weights"])


def _same_weights(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        rel = float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-12))
        assert rel < 1e-5, (k, rel)


# The proof on a DeepSeek-V3-shaped model (MLA, first-k dense, shared experts, group routing):
# pipeline stages combined with EP and with TP equal pp=1 at the same world size (4 ranks).
PP_WORLD4 = [({"pp": 2, "ep": 2, "dp": 2}, {"ep": 2, "dp": 4}), ({"pp": 2, "tp": 2}, {"tp": 2, "dp": 2})]


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("layout,flat", PP_WORLD4, ids=["pp2xep2", "pp2xtp2"])
def test_pipeline_equals_no_pipeline_at_the_same_world_size(converted, reference, layout, flat, tmp_path):
    ref = reference("deepseek_v3", 4, **flat)
    got = _worker(converted("deepseek_v3")[1], tmp_path / "got.pt", 4, save=tmp_path / "weights", **layout)
    _compare(got, ref)
    _same_weights(_weights(tmp_path / "weights"), ref["weights"])
