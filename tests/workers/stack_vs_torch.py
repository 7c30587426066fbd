"""One GRPO update by Megatron-Core's training stack (rl.policy: DDP, the distributed optimizer, the
schedule) and by plain PyTorch on the same one-process model (torch.optim.AdamW with Megatron's
weight-decay groups, torch.nn.utils.clip_grad_norm_, each micro-batch's loss normalised by the
global counts): both losses, grad norms and the largest relative weight difference, as JSON.

    python tests/workers/stack_vs_torch.py --model DIR --out F.json
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from policy_layouts import fixed_batch  # noqa: E402
from runtime import megatron as rt  # noqa: E402
from rl import schedule  # noqa: E402
from rl.config import ModelSection, OptimSection  # noqa: E402
from rl.grpo import LossConfig, grpo_loss  # noqa: E402
from rl.logprobs import sequence_logprobs  # noqa: E402
from rl.policy import Policy, load_weights, read_model_config  # noqa: E402
from rl.stack import build_chunks  # noqa: E402


def torch_step(model_dir, sec, optim, batch, loss_cfg, size):
    """What the trainer computed before it moved onto Megatron-Core's stack, in plain torch."""
    _, m = read_model_config(model_dir)
    model = build_chunks(m, sec, torch.float32)[0]
    load_weights([model], model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1], "weight_decay": optim.weight_decay},
                             {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                            lr=optim.lr, betas=optim.betas, eps=optim.eps)
    B = batch["tokens_BS"].shape[0]
    counts = dict(num_tokens=float(batch["mask_BT"].sum().clamp(min=1)), num_seqs=float(B))
    loss_sum = 0.0
    model.train()
    for mb in schedule.micro_batches(batch, size, 1, 0, False):
        d = mb.data
        logp, ent = sequence_logprobs(model, d["tokens_BS"], d["lengths_B"], vocab_size=m.vocab_size)
        loss, _ = grpo_loss(loss_cfg, logp_BT=logp, adv_B=d["adv_B"], mask_BT=d["mask_BT"], old_logp_BT=d["old_logp_BT"],
                            ref_logp_BT=d["ref_logp_BT"], entropy_BT=ent, **counts)
        loss.backward()
        loss_sum += float(loss.detach())
    norm = float(torch.nn.utils.clip_grad_norm_(params, optim.grad_clip))
    opt.step()
    return model, loss_sum, norm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rt.init_distributed()
    sec = ModelSection()
    # Adam's first update is lr * g / (|g| + eps): with eps 1e-8 it turns the rounding of gradients that
    # nearly cancel (the two paths sum micro-batches in another order) into up to ~1% of lr on single
    # elements (measured: weights 1.5e-4 apart, relative); eps 1e-4 keeps the step a function of g.
    optim = OptimSection(lr=1e-3, grad_clip=0.5, weight_decay=0.01, eps=1e-4)
    loss_cfg = LossConfig(kl_coef=0.1, entropy_coef=0.01)
    policy = Policy(a.model, sec, optim=optim, total_steps=1)
    tokens_BS, lengths_B, mask_BT, noise_BT = fixed_batch(policy.m.vocab_size)
    logp_BT = schedule.from_rank0(policy.logprobs(tokens_BS, lengths_B, micro_batch_size=2)[0])
    batch = dict(tokens_BS=tokens_BS, lengths_B=lengths_B, mask_BT=mask_BT, adv_B=torch.tensor([1.0, -0.5, 0.8, -1.2]),
                 old_logp_BT=logp_BT + noise_BT, ref_logp_BT=logp_BT - noise_BT)
    new = policy.train_mini_batch(batch, loss_cfg, micro_batch_size=1)
    old_model, old_loss, old_norm = torch_step(a.model, sec, optim, batch, loss_cfg, 1)
    new_params = dict(policy.chunks[0].named_parameters())
    worst = torch.zeros(1, dtype=torch.float64)
    for name, p in old_model.named_parameters():
        q = new_params[name].detach().float()
        worst = torch.maximum(worst, ((q - p.detach()).abs().max() / p.detach().abs().max().clamp(min=1e-12)).double())
    Path(a.out).write_text(json.dumps({"megatron": {"loss": new["loss"], "grad_norm": new["grad_norm"]},
                                       "torch": {"loss": old_loss, "grad_norm": old_norm},
                                       "weights_rel_max": float(worst)}))
    rt.destroy_distributed()


if __name__ == "__main__":
    main()
