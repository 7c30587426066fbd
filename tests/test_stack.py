"""rl.stack / rl.schedule: the trainer on Megatron-Core's own training stack (DDP, the distributed
optimizer, finalize_model_grads, the pipeline schedules).

* One step equals plain PyTorch on the same model (torch.optim.AdamW with Megatron's weight-decay
  groups, clip_grad_norm_, each micro-batch's loss normalised by global counts): loss, grad norm and
  updated weights to rel 1e-5 in fp32, dense and MoE. (Before rl/optim.py, the trainer's hand-written
  AdamW and gradient reduction, was deleted, the same worker compared it with the new stack on one rank,
  TP=2, DP=2 and EP=2 x DP=2: loss rel <= 1.5e-7, grad norm <= 7e-7, weights <= 2.6e-7.)
* Multi-rank layouts (TP, CP, DP, EP, PP, virtual stages, recompute) equal one process: tests/test_policy.py.
* The per-head q/k norms every family has are ones finalize_model_grads sums over TP (it finds them by
  name when qk_layernorm is set): without that sum, TP replicas drift apart after one step.
* Layout errors are one line, before a model is built.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from convert import hf2mcore
from tools.make_tiny import cached_tiny

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests/workers/stack_vs_torch.py"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            out = tmp_path_factory.mktemp(family) / "mcore"
            hf2mcore.run(str(cached_tiny(family, "fp32")), str(out))
            cache[family] = out
        return cache[family]
    return get


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe", "deepseek_v3"])
def test_megatron_stack_step_equals_plain_torch(converted, tmp_path, family):
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, str(WORKER), "--model", str(converted(family)), "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(out.read_text())
    print(json.dumps(got))
    assert got["megatron"]["loss"] == pytest.approx(got["torch"]["loss"], rel=1e-5)
    assert got["megatron"]["grad_norm"] == pytest.approx(got["torch"]["grad_norm"], rel=1e-5)
    assert got["megatron"]["grad_norm"] > 0.5  # above grad_clip 0.5: the clipped step is compared
    assert got["weights_rel_max"] < 1e-5


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "deepseek_v3", "glm4_moe"])
def test_per_head_qk_norms_are_the_ones_finalize_model_grads_sums_over_tp(family):
    """MCore sums q/k-norm gradients over TP when config.qk_layernorm and the name holds q_layernorm /
    k_layernorm (finalize_model_grads): every family's per-head (or latent) norms must match that rule."""
    from mapping.registry import family_for
    from runtime import megatron as rt

    cfg = json.loads((cached_tiny(family) / "config.json").read_text())
    m = family_for(cfg).read_config(cfg)
    rt.init_local()
    model = rt.build_from(m, meta=True)
    # norms inside attention other than the input norm fused into linear_qkv / q_up, gemma's norm after
    # linear_proj (it sees the full, TP-reduced hidden state) and MLA's kv latent norm (the whole latent
    # on every rank; under sequence parallelism summed as a sequence-parallel parameter: dsv3-tp2 in
    # tests/test_policy.py)
    skip = ("linear_qkv", "linear_q_up_proj", "linear_proj.post_layernorm", "kv_layernorm")
    norms = [n for n, _ in model.named_parameters() if "layernorm" in n and "self_attention" in n
             and not any(s in n for s in skip)]
    assert norms and model.config.qk_layernorm
    assert all(("q_layernorm" in n or "k_layernorm" in n) for n in norms), norms


def test_layout_errors_are_one_line(tmp_path):
    from rl.config import ModelSection
    from rl.stack import check_layout
    from mapping.registry import family_for

    cfg = json.loads((cached_tiny("deepseek_v3") / "config.json").read_text())  # 4 layers, 8 experts, 4 heads
    m = family_for(cfg).read_config(cfg)
    for sec, match in [(ModelSection(pp=3), "pp=3 does not divide the model's 4 decoder layers"),
                       (ModelSection(pp=2, pp_first_layers=3, pp_last_layers=2), "do not split evenly"),
                       (ModelSection(pp=2, vpp=4), "must divide into 4 virtual stages"),
                       (ModelSection(tp=3), "tp=3 does not divide the model's 4 attention heads"),
                       (ModelSection(ep=3, dp=3), "ep=3 does not divide the model's 8 routed experts")]:
        with pytest.raises(ValueError, match=match) as err:
            check_layout(sec, m)
        assert "\n" not in str(err.value)
    check_layout(ModelSection(pp=2, pp_first_layers=1, pp_last_layers=3), m)  # 1 + 3: fine
