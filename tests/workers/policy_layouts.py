"""One GRPO update of the tiny policy at a given TP/CP/EP/PP(/VPP) x DP layout (run under torchrun,
or alone for the 1-process reference); rank 0 saves log-probs, entropies, loss metrics and post-step
log-probs; with --save the updated weights are written as a torch_dist checkpoint too.

    torchrun --nproc-per-node 2 tests/workers/policy_layouts.py --model DIR --out F.pt --cp 2
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from runtime import megatron as rt
from rl.config import LoRASection, ModelSection, OptimSection  # noqa: E402
from rl.grpo import LossConfig  # noqa: E402
from rl.policy import Policy  # noqa: E402
from rl.schedule import from_rank0  # noqa: E402


def fixed_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths_B = torch.tensor([21, 14, 17, 9])
    B, S = 4, 21
    tokens_BS = torch.randint(5, vocab, (B, S), generator=g)
    mask_BT = torch.zeros(B, S - 1, dtype=torch.bool)
    for b, n in enumerate(lengths_B.tolist()):
        tokens_BS[b, n:] = 0
        mask_BT[b, 4: n - 1] = True  # a 5-token prompt, the rest is the response
    noise_BT = 0.3 * torch.randn(B, S - 1, generator=g)
    return tokens_BS, lengths_B, mask_BT, noise_BT


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--pp-first", type=int, default=None)
    ap.add_argument("--recompute", default="none")
    ap.add_argument("--save", help="also write the updated weights here (checkpoint.save_model)")
    ap.add_argument("--lora-init", default=None, help="train LoRA adapters started from this PEFT directory")
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rt.init_distributed(tp=a.tp, cp=a.cp, ep=a.ep, pp=a.pp, vpp=a.vpp)
    lora = LoRASection()
    if a.lora_init:
        import json

        cfg = json.loads((Path(a.lora_init) / "adapter_config.json").read_text())
        lora = LoRASection(rank=cfg["r"], alpha=cfg["lora_alpha"], targets=tuple(a.lora_targets.split(",")),
                           init_from=a.lora_init)
    sec = ModelSection(tp=a.tp, cp=a.cp, dp=a.dp, ep=a.ep, pp=a.pp, vpp=a.vpp, pp_first_layers=a.pp_first,
                       recompute=a.recompute, lora=lora)
    # Adam's first update is lr * g / (|g| + eps): with eps 1e-8 it would turn the rounding of gradients
    # that nearly cancel (layouts sum in other orders) into up to ~1% of lr on single weights
    policy = Policy(a.model, sec, optim=OptimSection(lr=1e-3, grad_clip=0.0, eps=1e-4), total_steps=1)
    tokens_BS, lengths_B, mask_BT, noise_BT = fixed_batch(policy.m.vocab_size)
    logp_BT, ent_BT = from_rank0(policy.logprobs(tokens_BS, lengths_B, micro_batch_size=2, with_entropy=True))
    batch = dict(tokens_BS=tokens_BS, lengths_B=lengths_B, mask_BT=mask_BT, adv_B=torch.tensor([1.0, -0.5, 0.8, -1.2]),
                 old_logp_BT=logp_BT + noise_BT, ref_logp_BT=logp_BT - noise_BT)
    metrics = policy.train_mini_batch(batch, LossConfig(kl_coef=0.1, entropy_coef=0.01), micro_batch_size=2)
    after_BT, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=2)
    if a.save:
        from rl import checkpoint

        checkpoint.save_model(policy, Path(a.save))
    if torch.distributed.get_rank() == 0:
        torch.save({"logp": logp_BT, "entropy": ent_BT, "metrics": metrics, "after": after_BT, "mask": mask_BT},
                   a.out)
    rt.destroy_distributed()


if __name__ == "__main__":
    main()
