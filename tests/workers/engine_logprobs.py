"""Start a vLLM engine from --model (a fresh process: one engine at a time) and write its prompt
logprobs for the sequences in --seqs (JSON list of token lists) to --out (JSON)."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rl.rollout.vllm_engine import VLLMConfig, VLLMEngine  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seqs", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    seqs = json.loads(Path(a.seqs).read_text())
    engine = VLLMEngine(VLLMConfig(model=a.model, dtype=a.dtype, max_model_len=256, kv_cache_bytes=64 << 20))
    got = torch.stack(engine.prompt_logprobs(seqs))
    Path(a.out).write_text(json.dumps(got.tolist()))
    engine.close()


if __name__ == "__main__":
    main()
