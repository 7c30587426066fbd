"""Checkpoint and resume through Megatron-Core's stack (rl.checkpoint): the policy's chunks, the
optimizer's state in the distributed optimizer's fully_reshardable format, the lr schedule.

Judged by the step AFTER the load (a load that looks exact can still step wrong: PLATFORM.md, torch
Adam's shared step): the resumed run's metrics and post-step log-probs equal the uninterrupted run's,
bitwise at the same layout (PP=2, and the replicated optimizer at one rank), and to fp32 rounding
after resharding a PP=2 checkpoint to PP=1 (one rank) and to EP=2 x DP=2 (where the optimizer is a
chain of a dense and an expert optimizer instead of one)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convert import hf2mcore
from runtime.net import free_port
from tools.make_tiny import cached_tiny

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests/workers/resume_layouts.py"


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "mcore"
    hf2mcore.run(str(cached_tiny("qwen3_moe", "fp32")), str(out))
    return out


def _run(model, ckpt, out, phase, nproc=1, **layout) -> dict:
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                   str(nproc), "--master-port", str(free_port())]
    cmd = [*launch, str(WORKER), "--model", str(model), "--ckpt", str(ckpt), "--out", str(out), "--phase", phase,
           *[f"--{k.replace('_', '-')}={v}" for k, v in layout.items()]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {**torch.load(out), "stderr": r.stderr}


@pytest.fixture(scope="module")
def pp2_run(moe, tmp_path_factory):
    d = tmp_path_factory.mktemp("pp2")
    return d / "ckpt", _run(moe, d / "ckpt", d / "save.pt", "save", 2, pp=2)


@pytest.mark.multiproc
def test_resume_at_the_same_pipeline_layout_is_bitwise(moe, pp2_run, tmp_path):
    ckpt, whole = pp2_run
    got = _run(moe, ckpt, tmp_path / "got.pt", "resume", 2, pp=2)
    assert got["metrics"] == whole["metrics"] and whole["metrics"]["lr"] > 0
    assert torch.equal(got["after"], whole["after"])


@pytest.mark.multiproc
@pytest.mark.parametrize("nproc,layout", [(1, {}), (2, {"ep": 2, "dp": 2})], ids=["pp1", "ep2xdp2"])
def test_a_pp2_checkpoint_reshards(moe, pp2_run, tmp_path, nproc, layout):
    ckpt, whole = pp2_run
    got = _run(moe, ckpt, tmp_path / "got.pt", "resume", nproc, **layout)
    assert "the per-rank RNG states are not restored" in got["stderr"]  # said once, in one line
    for k in ("loss", "grad_norm", "lr", "clip_frac"):
        assert got["metrics"][k] == pytest.approx(whole["metrics"][k], rel=1e-5), k
    torch.testing.assert_close(got["after"], whole["after"], atol=1e-5, rtol=0)


def test_the_replicated_optimizer_resumes_bitwise(moe, tmp_path):
    whole = _run(moe, tmp_path / "ckpt", tmp_path / "save.pt", "save", distributed=0)
    got = _run(moe, tmp_path / "ckpt", tmp_path / "got.pt", "resume", distributed=0)
    assert got["metrics"] == whole["metrics"] and torch.equal(got["after"], whole["after"])


@pytest.mark.multiproc
def test_a_lora_run_resumes_bitwise_and_its_checkpoint_holds_only_the_base_it_started_from(moe, tmp_path):
    """PP=2 LoRA run: adapters and their optimizer state are checkpointed and resumed bitwise; the base
    weights in the checkpoint are the converted ones (frozen)."""
    from test_lora import make_adapter

    adapter = make_adapter("qwen3_moe", ("q_proj", "k_proj", "v_proj", "o_proj"), tmp_path / "adapter")
    whole = _run(moe, tmp_path / "ckpt", tmp_path / "save.pt", "save", 2, pp=2, lora_init=adapter)
    got = _run(moe, tmp_path / "ckpt", tmp_path / "got.pt", "resume", 2, pp=2, lora_init=adapter)
    assert got["metrics"] == whole["metrics"] and torch.equal(got["after"], whole["after"])
