"""Benchmark the LoRA live sync (adapters only, from memory) against the full-weight sync of the same model.

    python -m tools.bench_lora_sync [--rank 8] [--repeats 5] [--json-out FILE]

Two parts, printed side by side:
  derived  on the published Qwen2.5-7B config (tests/fixtures/published): the bytes a rank-r adapter on
           all seven linears of every layer sends per step against the bytes of the whole model (bf16 both),
           counted from a Megatron-Core meta model (no weights) and the family's LoRA sites;
  measured on a fabricated tiny Qwen2 (fp32), one vLLM-CPU engine with LoRA enabled, in this process:
           ``set_lora`` of a rank-r adapter (rl.rollout.vllm_lora: built and registered in the worker) against
           ``update_weights`` of every HF tensor (vLLM's in-place reload with the completeness check), both
           from tensors already in memory, alternating which goes first; median seconds and bytes of each.
Last line: one JSON object with every figure. Leaves out: the trainer-side gather (tests/test_lora.py covers
its correctness; it moves the same bytes over torch.distributed). Without it "adapters are <= 1% of the
weights" would be a guess.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def derived(rank: int) -> dict:
    """Adapter vs model bytes for the published Qwen2.5-7B config (bf16), from a meta model."""
    from mapping import lora as L
    from mapping.registry import family_for
    from runtime import megatron as rt

    cfg = json.loads((ROOT / "tests/fixtures/published/Qwen2.5-7B/config.json").read_text())
    family = family_for(cfg)
    m = family.read_config(cfg)
    rt.init_local()
    model = rt.build_from(m, meta=True)
    total = sum(p.numel() for p in model.parameters())
    shapes = dict(model.state_dict(keep_vars=True).items())
    adapter = 0
    for site in L.lora_sites(family, m, ALL):
        rows, cols = shapes[site.entry.mcore].shape
        from mapping import rules as R
        import torch

        parts = R.OPS[site.entry.rule.op].to_hf(torch.empty(rows, cols, device="meta"), m.shapes)
        adapter += sum(rank * (cols + p.shape[0]) for p, hit in zip(parts, site.targeted) if hit)
    return {"model": "Qwen2.5-7B", "rank": rank, "params": total, "adapter_params": adapter,
            "adapter_fraction": adapter / total}


def measured(rank: int, repeats: int, workdir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from rl.rollout.vllm_engine import VLLMConfig, VLLMEngine
    from tools.make_adapter import make_adapter
    from tools.make_tiny import make_tiny

    hf = workdir / "qwen2"
    if not (hf / "config.json").is_file():
        make_tiny("qwen2", hf, dtype="fp32")
    adapter = make_adapter(hf, ALL, workdir / "adapter", rank, alpha=2.0 * rank)
    engine = VLLMEngine(VLLMConfig(model=str(hf), dtype="float32", max_model_len=256, kv_cache_bytes=64 << 20,
                                   max_lora_rank=rank))
    weights = {}
    for f in sorted(hf.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    times = {"lora": [], "full": []}
    version = 0
    for i in range(repeats + 1):
        for name in (("lora", "full") if i % 2 == 0 else ("full", "lora")):
            version += 1
            t = time.perf_counter()
            if name == "lora":
                engine.set_lora(tensors, config, version)
            else:
                engine.update_weights(weights.items(), expected=list(weights))
            if i:  # the first round warms both paths
                times[name].append(time.perf_counter() - t)
    del torch
    nbytes = lambda d: sum(t.numel() * t.element_size() for t in d.values())  # noqa: E731
    return {"lora_s": statistics.median(times["lora"]), "full_s": statistics.median(times["full"]),
            "lora_bytes": nbytes(tensors), "full_bytes": nbytes(weights)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_lora_sync", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=8, help="adapter rank (default 8)")
    ap.add_argument("--repeats", type=int, default=5, help="timed syncs of each kind (median reported)")
    ap.add_argument("--workdir", default=None, help="where the tiny model is fabricated (default: a temp dir)")
    ap.add_argument("--json-out", default=None, help="append the JSON result line to this file")
    a = ap.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # the engine first: an in-process vLLM engine must start before this process's torch.distributed group,
    # which the derived count's meta model needs
    m = measured(a.rank, a.repeats, Path(a.workdir or tempfile.mkdtemp(prefix="bench_lora_sync-")))
    d = derived(a.rank)
    print(f"derived {d['model']} rank {a.rank} on all 7 linears: adapters {d['adapter_params'] / 1e6:.1f}M of "
          f"{d['params'] / 1e9:.2f}B parameters = {100 * d['adapter_fraction']:.3f}% of the bytes per sync (goal <= 1%)")
    print(f"measured tiny qwen2: adapter sync {m['lora_s'] * 1e3:.1f} ms for {m['lora_bytes'] / 2**20:.2f} MiB, full "
          f"sync {m['full_s'] * 1e3:.1f} ms for {m['full_bytes'] / 2**20:.2f} MiB: bytes "
          f"{m['lora_bytes'] / m['full_bytes']:.3f}x, time {m['lora_s'] / m['full_s']:.3f}x")
    summary = {"derived": d, "measured": m}
    print(json.dumps(summary))
    if a.json_out:
        with open(a.json_out, "a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
