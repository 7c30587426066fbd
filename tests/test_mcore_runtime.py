"""Megatron-Core on CPU: build, forward/backward, determinism, torch_dist save + reload, and
resharded loads at TP=2 / EP=2 under torchrun compared against the single-process logits."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import megatron as rt
from mcore_configs import batch, tiny_config
from runtime.net import free_port

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["dense", "mla_moe"]


@pytest.fixture(scope="module")
def single_process():
    rt.init_distributed(tp=1, ep=1)
    yield
    rt.destroy_distributed()


def _logits(model):
    ids, pos = batch()
    return model(ids, pos, rt.causal_mask(ids.shape[1]))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_deterministic(single_process, kind):
    outs = []
    for _ in range(2):
        rt.init_distributed(tp=1, ep=1, seed=7)
        model = rt.build_gpt_model(tiny_config(kind), vocab_size=512, max_sequence_length=64)
        out = _logits(model)
        out.float().pow(2).mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        outs.append(out.detach())
    assert outs[0].shape == (2, 16, 512)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_reload_into_fresh_model(single_process, kind, tmp_path):
    from megatron.core import dist_checkpointing

    rt.init_distributed(tp=1, ep=1, seed=1)
    a = rt.build_gpt_model(tiny_config(kind), vocab_size=512, max_sequence_length=64)
    dist_checkpointing.save(a.sharded_state_dict(), str(tmp_path))
    meta = (tmp_path / "metadata.json").read_text()
    assert '"sharded_backend": "torch_dist"' in meta
    rt.init_distributed(tp=1, ep=1, seed=2)
    b = rt.build_gpt_model(tiny_config(kind), vocab_size=512, max_sequence_length=64)
    with torch.no_grad():
        assert not torch.equal(_logits(a), _logits(b))
        b.load_state_dict(dist_checkpointing.load(b.sharded_state_dict(), str(tmp_path)))
        assert torch.equal(_logits(a), _logits(b))


def test_meta_device_build_allocates_nothing(single_process):
    model = rt.build_gpt_model(tiny_config("mla_moe"), vocab_size=512, max_sequence_length=64, meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    keys = {getattr(v, "key", k) for k, v in model.sharded_state_dict().items()}
    assert "decoder.layers.1.mlp.router.expert_bias" in keys
    assert "decoder.layers.0.self_attention.linear_kv_down_proj.weight" in keys


@pytest.mark.multiproc
@pytest.mark.parametrize("kind,tp,ep", [("dense", 2, 1), ("mla_moe", 2, 1), ("mla_moe", 1, 2)])
def test_torchrun_resharded_load(kind, tp, ep, tmp_path):
    """Save at TP=EP=1 in this process; load at TP=2 / EP=2 in two torchrun ranks."""
    from megatron.core import dist_checkpointing

    rt.init_distributed(tp=1, ep=1, seed=3)
    model = rt.build_gpt_model(tiny_config(kind), vocab_size=512, max_sequence_length=64)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
    with torch.no_grad():
        torch.save(_logits(model), tmp_path / "ref.pt")
    rt.destroy_distributed()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), str(ROOT / "tests/workers/mcore_layout.py"),
           "--kind", kind, "--tp", str(tp), "--ep", str(ep), "--load", str(ckpt),
           "--ref", str(tmp_path / "ref.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("grads_ok=True") == 2, r.stdout
