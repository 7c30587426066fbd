"""hf2mcore / mcore2hf on every family's tiny model: bitwise round trips, and the written
checkpoint loaded by Megatron-Core's own ``dist_checkpointing.load`` into an independently built
GPTModel reproduces transformers' logits (in process at TP=1, under torchrun at TP=2 / EP=2)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convert import hf2mcore, mcore2hf
from runtime import megatron as rt
from convert_helpers import BIASED_EXPERTS, FAMILIES, MOE, fixed_tokens, hf_tensors, mcore_logits, \
    mcore_model_from, transformers_logits
from tools.make_tiny import cached_tiny
from runtime.net import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(family, dtype) -> (hf_dir, mcore_root), converted once per module."""
    cache = {}

    def get(family, dtype="fp32", mtp=False):
        if (family, dtype, mtp) not in cache:
            hf = cached_tiny(family, dtype=dtype, mtp=mtp)
            out = tmp_path_factory.mktemp(f"{family}-{dtype}") / "mcore"
            hf2mcore.run(str(hf), str(out))
            cache[family, dtype, mtp] = (hf, out)
        return cache[family, dtype, mtp]
    return get


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_bitwise(converted, family, dtype, tmp_path):
    hf, out = converted(family, dtype)
    back = tmp_path / "hf"
    res = mcore2hf.run(str(out), str(back), max_shard_size="4MB")
    assert res["files"] >= 2
    a, b = hf_tensors(hf), hf_tensors(back)
    assert sorted(a) == sorted(b)
    diff = [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])]
    assert diff == []
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(back).architectures == AutoConfig.from_pretrained(hf).architectures


def test_deepseek_mtp_layer_round_trip(converted, tmp_path):
    """The MTP layer (HF layer index num_hidden_layers) maps to mtp.layers.0 and back, bitwise."""
    hf, out = converted("deepseek_v3", "fp32", mtp=True)
    from convert.formats import Reader
    from convert.formats import checkpoint_dir

    keys = Reader(checkpoint_dir(out)).keys()
    assert "mtp.layers.0.eh_proj.weight" in keys and "mtp.layers.0.transformer_layer.mlp.router.expert_bias" in keys
    mcore2hf.run(str(out), str(tmp_path / "hf"))
    a, b = hf_tensors(hf), hf_tensors(tmp_path / "hf")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert any(n.startswith("model.layers.4.shared_head") for n in b)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_tp1(converted, family):
    hf, out = converted(family)
    rt.init_distributed(tp=1, ep=1, seed=123)
    model, m = mcore_model_from(out)
    ids = fixed_tokens(m.vocab_size)
    ref = transformers_logits(hf, ids)
    got = mcore_logits(model, m, ids)
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-4 * max(1.0, ref.abs().max().item()), f"{family}: max |dlogit| = {diff}"
    rt.destroy_distributed()


LAYOUTS = [(f, 2, 1) for f in FAMILIES] + [(f, 1, 2) for f in sorted(MOE)]


@pytest.mark.multiproc
@pytest.mark.parametrize("family,tp,ep", LAYOUTS)
def test_logits_match_transformers_torchrun(converted, family, tp, ep, tmp_path):
    hf, out = converted(family)
    ids = fixed_tokens(512)
    torch.save({"ids": ids, "ref": transformers_logits(hf, ids)}, tmp_path / "ref.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), str(ROOT / "tests/workers/convert_logits.py"),
           "--mcore", str(out), "--tp", str(tp), "--ep", str(ep), "--ref", str(tmp_path / "ref.pt")]
    if family in BIASED_EXPERTS and tp > 1:  # Megatron-Core: experts with biases need ETP 1
        cmd += ["--etp", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("OK") == 2, r.stdout
