"""Shared by the conversion tests: convert a cached tiny checkpoint once per session, compare
HF tensors, build an MCore model from a converted directory and run transformers' forward."""
from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3", "moonlight"]
MOE = {"qwen3_moe", "deepseek_v3", "moonlight"}


def hf_tensors(directory) -> dict[str, torch.Tensor]:
    from convert.hf_checkpoint import HFCheckpoint

    ck = HFCheckpoint(directory)
    return {n: ck.get(n) for n in ck.names()}


def fixed_tokens(vocab: int, b: int = 2, s: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def transformers_logits(hf_dir, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def mcore_model_from(mcore_root, tp: int = 1, ep: int = 1, dtype=torch.float32):
    """A GPTModel built independently from config.json and loaded by MCore's own loader."""
    from convert import mcore_runtime as rt
    from convert.outdir import checkpoint_dir
    from mapping.registry import family_for

    cfg = json.loads((Path(mcore_root) / "hf" / "config.json").read_text())
    m = family_for(cfg).read_config(cfg)
    model = rt.build_from(m, dtype=dtype, tp=tp, ep=ep)
    ckpt = checkpoint_dir(mcore_root)
    model.load_state_dict(rt.load_checkpoint(model, ckpt))
    return model.eval(), m


def mcore_logits(model, m, ids: torch.Tensor) -> torch.Tensor:
    from convert import mcore_runtime as rt
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        out = model(ids, pos, rt.causal_mask(ids.shape[1]))
        out = gather_from_tensor_model_parallel_region(out)
    return out[..., : m.vocab_size].float()
