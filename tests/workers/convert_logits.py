"""torchrun worker: load a converted checkpoint at --tp/--ep with MCore's own loader and
compare logits with transformers' (precomputed in --ref). Prints OK per rank on success."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import megatron as rt
from convert_helpers import mcore_logits, mcore_model_from  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mcore", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--etp", type=int, default=None, help="expert-tensor-parallel size (default: tp)")
    ap.add_argument("--ref", required=True)
    a = ap.parse_args()
    rt.init_distributed(tp=a.tp, ep=a.ep, etp=a.etp, seed=77)
    model, m = mcore_model_from(a.mcore, tp=a.tp, ep=a.ep, etp=a.etp)
    ref = torch.load(a.ref)
    ids = ref["ids"] % m.vocab_size
    got = mcore_logits(model, m, ids)
    want = ref["ref"]
    diff = (got - want).abs().max().item()
    ok = diff <= 1e-4 * max(1.0, want.abs().max().item())
    print(f"rank {torch.distributed.get_rank()} tp={a.tp} ep={a.ep} max|dlogit|={diff:.3e} {'OK' if ok else 'FAIL'}")
    rt.destroy_distributed()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
