"""Shared by the conversion tests: convert a cached tiny checkpoint once per session, compare
HF tensors, build an MCore model from a converted directory and run transformers' forward."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mapping.registry import FAMILIES as _REGISTRY
from runtime.net import free_port
from tools.tiny_configs import published_config

FAMILIES = sorted(_REGISTRY)  # every registered family has a tiny preset (tests/test_readme.py)
MOE = {f for f in FAMILIES  # families whose tiny preset has experts
       if _REGISTRY[f].read_config(published_config(f)).num_experts}
# Experts with biases (gpt-oss): Megatron-Core allows them only at expert-tensor-parallel size 1.
BIASED_EXPERTS = {f for f in MOE if _REGISTRY[f].read_config(published_config(f)).transformer.get("add_bias_linear")}


def hf_tensors(directory) -> dict[str, torch.Tensor]:
    from convert.formats import HFCheckpoint

    ck = HFCheckpoint(directory)
    return {n: ck.get(n) for n in ck.names()}


def fixed_tokens(vocab: int, b: int = 2, s: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def transformers_logits(hf_dir, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def mcore_model_from(mcore_root, tp: int = 1, ep: int = 1, dtype=torch.float32, etp=None):
    """A GPTModel built independently from config.json and loaded by MCore's own loader."""
    from runtime import megatron as rt
    from convert.formats import checkpoint_dir
    from mapping.registry import family_for

    cfg = json.loads((Path(mcore_root) / "hf" / "config.json").read_text())
    m = family_for(cfg).read_config(cfg)
    model = rt.build_from(m, dtype=dtype, tp=tp, ep=ep, etp=etp)
    ckpt = checkpoint_dir(mcore_root)
    model.load_state_dict(rt.load_checkpoint(model, ckpt))
    return model.eval(), m


def mcore_logits(model, m, ids: torch.Tensor) -> torch.Tensor:
    from runtime import megatron as rt
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        out = model(ids, pos, rt.causal_mask(ids.shape[1]))
        out = gather_from_tensor_model_parallel_region(out)
    return out[..., : m.vocab_size].float()


def consumer_logits_torchrun(cases: dict[str, dict], tp: int, ep: int, ids_BS: torch.Tensor, work: Path):
    """Run ``tests/workers/consumer_load.py`` under one torchrun of 2 ranks for many models.

    ``cases``: name -> {"flags": text, "config": path, "ckpt": dir, "overrides": dict (optional)};
    returns name -> fp32 logits ``[B, S, Vp]``, or the worker's one-line error for that case."""
    import os
    import subprocess
    import sys

    work = Path(work)
    rows = []
    for name, case in cases.items():
        (work / f"{name}.flags").write_text(case["flags"])
        rows.append(dict(flags=str(work / f"{name}.flags"), config=str(case["config"]), ckpt=str(case["ckpt"]),
                         out=str(work / f"{name}.pt"), overrides=case.get("overrides")))
    (work / "cases.json").write_text(json.dumps(rows))
    torch.save(ids_BS, work / "ids.pt")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), str(root / "tests/workers/consumer_load.py"),
           "--cases", str(work / "cases.json"), "--tp", str(tp), "--ep", str(ep), "--ids", str(work / "ids.pt")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {name: (torch.load(work / f"{name}.pt") if (work / f"{name}.pt").exists()
                   else (work / f"{name}.pt.err").read_text().strip()) for name in cases}


def consumer_logits_per_layout(cases_for, ids_BS: torch.Tensor, tmp_path_factory):
    """``get(tp, ep)``: ``consumer_logits_torchrun`` of ``cases_for(tp, ep)``, one torchrun per layout,
    run on first use and kept (for module-scoped fixtures)."""
    cache = {}

    def get(tp, ep):
        if (tp, ep) not in cache:
            cache[tp, ep] = consumer_logits_torchrun(cases_for(tp, ep), tp, ep, ids_BS,
                                                     tmp_path_factory.mktemp(f"tp{tp}ep{ep}"))
        return cache[tp, ep]
    return get
