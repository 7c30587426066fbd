"""torchrun worker: build a tiny MCore model at --tp/--ep, run forward + backward, and either
save a torch_dist checkpoint (--save) or load one (--load) and compare logits to a reference
file written by a single-process run. Exit code 0 only if every check passes."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import megatron as rt
from mcore_configs import batch, tiny_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--load", required=True, help="torch_dist checkpoint written at TP=EP=1")
    ap.add_argument("--ref", required=True, help="logits .pt written by the single-process run")
    a = ap.parse_args()
    rt.init_distributed(tp=a.tp, ep=a.ep, seed=999)  # another seed: weights must come from disk
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model = rt.build_gpt_model(tiny_config(a.kind, a.tp, a.ep), vocab_size=512, max_sequence_length=64)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), a.load))
    ids, pos = batch()
    logits = model(ids, pos, rt.causal_mask(ids.shape[1]))
    full = gather_from_tensor_model_parallel_region(logits)
    full.sum().backward()
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()
                   if p.requires_grad)
    ref = torch.load(a.ref)
    diff = (full.detach() - ref).abs().max().item()
    print(f"rank {torch.distributed.get_rank()} tp={a.tp} ep={a.ep} max|dlogits|={diff:.3e} grads_ok={grads_ok}")
    ok = diff <= 1e-4 * max(1.0, ref.abs().max().item()) and grads_ok
    rt.destroy_distributed()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
