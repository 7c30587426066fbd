"""Run one vLLM engine (a fresh process: vLLM binds threads and creates a process group, which
must not leak into pytest's process) through the rollout-engine contract and record raw
observations as JSON for tests/test_rollout.py to judge. --scenario dense | mla."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rl.rollout import SamplingConfig, WeightUpdateError  # noqa: E402
from rl.rollout.vllm_engine import VLLMConfig, VLLMEngine  # noqa: E402

SEQS = [[1, 5, 7, 9, 11, 300, 2, 17, 45, 99, 120, 33], [4, 4, 4, 4, 8, 200, 201, 202]]


def hf_weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def lp(engine, seqs=SEQS):
    return [x.tolist() for x in engine.prompt_logprobs(seqs)]


def attempt(engine, items, expected):
    try:
        engine.update_weights(items, expected=expected)
        return None
    except WeightUpdateError as err:
        return str(err)


def sampling(engine, r):
    cfg = SamplingConfig(n=3, max_tokens=8, temperature=1.0, seed=7)
    prompts = [[1, 5, 7], [2, 3, 4, 5]]
    runs = [engine.generate(prompts, cfg) for _ in range(2)]
    r["samples"] = [[[list(s.token_ids), list(s.logprobs), s.finish_reason] for s in group] for group in runs[0]]
    r["samples_again"] = [[[list(s.token_ids), list(s.logprobs), s.finish_reason] for s in group] for group in runs[1]]
    full = [p + list(s.token_ids) for p, group in zip(prompts, runs[0]) for s in group]
    r["teacher_forced"] = [x.tolist() for x in engine.prompt_logprobs(full)]
    r["prompts"] = prompts
    greedy = engine.generate([prompts[0]], SamplingConfig(n=1, max_tokens=8, temperature=0.0))[0][0]
    stop_at = greedy.token_ids[2]
    stopped = engine.generate([prompts[0]], SamplingConfig(n=1, max_tokens=8, temperature=0.0,
                                                           stop_token_ids=(stop_at,)))[0][0]
    r["greedy"], r["stop_at"] = list(greedy.token_ids), stop_at
    r["stopped"] = [list(stopped.token_ids), stopped.finish_reason]


def updates(engine, model_dir, r):
    w = hf_weights(model_dir)
    names = list(w)
    r["initial"] = lp(engine)
    target = next(n for n in names if n.endswith("layers.1.self_attn.o_proj.weight"))
    changed = dict(w, **{target: w[target] * 1.5})
    r["report"] = vars(engine.update_weights(changed.items(), expected=names))
    r["perturbed"] = lp(engine)
    engine.update_weights(w.items(), expected=names)
    r["restored"] = lp(engine)
    dropped = next(n for n in names if "layers.0" in n and ("k_proj" in n or "kv_a_proj" in n))
    r["dropped"] = dropped
    r["missing_error"] = attempt(engine, [(n, t) for n, t in changed.items() if n != dropped], names)
    r["missing_error_no_list"] = attempt(engine, [(n, t) for n, t in changed.items() if n != dropped], None)
    r["after_missing"] = lp(engine)
    r["duplicate_error"] = attempt(engine, list(w.items()) + [(names[3], w[names[3]])], names)
    r["unexpected_error"] = attempt(engine, list(w.items()) + [("model.layers.0.bogus.weight", w[names[0]])], names)
    r["after_errors"] = lp(engine)


def empty_kv_b(worker) -> int:
    """Do to kv_b_proj what vLLM's AMX MLA backend does after loading (replace it by 0 elements)."""
    from vllm.model_executor.layers.attention import MLAAttention

    n = 0
    for mod in worker.model_runner.get_model().modules():
        if isinstance(mod, MLAAttention):
            mod.kv_b_proj.weight = torch.nn.Parameter(torch.empty(0, dtype=mod.kv_b_proj.weight.dtype),
                                                      requires_grad=False)
            n += 1
    return n


def raw_vllm_reload(worker, items) -> str:
    try:
        worker.model_runner.reload_weights(weights_iterator=iter(items))
        return ""
    except RuntimeError as err:
        return str(err)


def rope_kernel(worker) -> dict:
    """vLLM's CPU rotary kernel vs its own pure-torch forward_native on MLA's 3-D strided q."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    from runtime.patches import vllm as vllm_patches

    rope = next(m for m in worker.model_runner.get_model().modules() if isinstance(m, RotaryEmbedding))
    g = torch.Generator().manual_seed(0)
    d = rope.head_size
    q_full = torch.randn(6, 4, 2 * d, generator=g).to(rope.cos_sin_cache.dtype)
    k = torch.randn(6, 1, d, generator=g).to(q_full.dtype)
    pos = torch.arange(6) + 5
    want_q, _ = rope.forward_native(pos, q_full[..., d:].clone(), k.clone())
    raw = q_full.clone()
    RotaryEmbedding.forward_cpu(rope, pos, raw[..., d:], k.clone())
    fixed = q_full.clone()
    vllm_patches._rope_forward_cpu_2d(rope, pos, fixed[..., d:], k.clone())
    return dict(raw=(raw[..., d:].float() - want_q.float()).abs().max().item(),
                fixed=(fixed[..., d:].float() - want_q.float()).abs().max().item(),
                untouched=torch.equal(fixed[..., :d], q_full[..., :d]))


def mla(engine, model_dir, r):
    w = hf_weights(model_dir)
    names = list(w)
    s = SEQS[0]
    r["prefix_full"] = engine.prompt_logprobs([s])[0].tolist()
    r["prefix_short"] = engine.prompt_logprobs([s[:7]])[0].tolist()
    r["initial"] = lp(engine)
    r["rope_kernel"] = engine.llm.collective_rpc(rope_kernel)[0]
    r["report"] = vars(engine.update_weights(w.items(), expected=names))
    r["reloaded"] = lp(engine)
    r["emptied"] = engine.llm.collective_rpc(empty_kv_b)[0]
    r["report_kv_b"] = vars(engine.update_weights(w.items(), expected=names))
    r["reloaded_kv_b"] = lp(engine)
    engine.llm.collective_rpc(empty_kv_b)  # last: vLLM's own reload leaves the model broken
    r["raw_vllm_error"] = engine.llm.collective_rpc(raw_vllm_reload, args=(list(w.items()),))[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", required=True)
    ap.add_argument("--scenario", choices=["dense", "mla"], required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    engine = VLLMEngine(VLLMConfig(model=a.model, dtype=a.dtype, max_model_len=256, kv_cache_bytes=64 << 20))
    r = {"fixes": engine.fixes, "eos": list(engine.eos_token_ids), "dtype": str(engine.dtype), "seqs": SEQS}
    if a.scenario == "dense":
        sampling(engine, r)
        updates(engine, a.model, r)
    else:
        mla(engine, a.model, r)
    Path(a.out).write_text(json.dumps(r))


if __name__ == "__main__":
    main()
