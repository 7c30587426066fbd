"""Checkpoint and resume through Megatron-Core's stack (run under torchrun, or alone):

    --phase save    step on batch A, rl.checkpoint.save into --ckpt, step on batch B
    --phase resume  rl.checkpoint.load from --ckpt (any layout), step on batch B

Rank 0 writes batch B's metrics and the log-probs after it to --out: at the same layout a resumed run
must equal the uninterrupted one bitwise; at another layout (pp=2 -> pp=1) closely (weights and the
distributed optimizer's state reshard). The lr schedule warms up over 2 steps, so its state matters.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from policy_layouts import fixed_batch  # noqa: E402
from runtime import megatron as rt  # noqa: E402
from rl import checkpoint  # noqa: E402
from rl.config import LoRASection, ModelSection, OptimSection  # noqa: E402
from rl.grpo import LossConfig  # noqa: E402
from rl.policy import Policy  # noqa: E402
from rl.schedule import from_rank0  # noqa: E402


def batch(policy, seed: int) -> dict:
    tokens_BS, lengths_B, mask_BT, noise_BT = fixed_batch(policy.m.vocab_size, seed)
    logp_BT = from_rank0(policy.logprobs(tokens_BS, lengths_B, micro_batch_size=2)[0])
    return dict(tokens_BS=tokens_BS, lengths_B=lengths_B, mask_BT=mask_BT, adv_B=torch.tensor([1.0, -0.5, 0.8, -1.2]),
                old_logp_BT=logp_BT + noise_BT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--phase", choices=("save", "resume"), required=True)
    for k in ("tp", "pp", "ep", "dp", "distributed"):
        ap.add_argument(f"--{k}", type=int, default=1)
    ap.add_argument("--lora-init", default=None, help="train LoRA adapters (q, k, v, o) started from this PEFT dir")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rt.init_distributed(tp=a.tp, pp=a.pp, ep=a.ep, seed=7)
    lora = LoRASection()
    if a.lora_init:
        lora = LoRASection(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"), init_from=a.lora_init)
    sec = ModelSection(tp=a.tp, pp=a.pp, ep=a.ep, dp=a.dp, lora=lora)
    optim = OptimSection(lr=1e-3, warmup_steps=2, schedule="cosine", weight_decay=0.01, eps=1e-4,
                         distributed=bool(a.distributed))
    policy = Policy(a.model, sec, optim=optim, total_steps=4)
    loss = LossConfig(clip_eps_low=0.2, clip_eps_high=0.28)
    if a.phase == "save":
        policy.train_mini_batch(batch(policy, 1), loss, micro_batch_size=2)
        checkpoint.save(policy, Path(a.ckpt), {"step": 1})
    else:
        state = checkpoint.load(policy, Path(a.ckpt))
        assert state["step"] == 1, state
    metrics = policy.train_mini_batch(batch(policy, 2), loss, micro_batch_size=2)
    tokens_BS, lengths_B, *_ = fixed_batch(policy.m.vocab_size, 3)
    after, _ = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=2)
    if torch.distributed.get_rank() == 0:
        torch.save({"metrics": metrics, "after": after}, a.out)
    rt.destroy_distributed()


if __name__ == "__main__":
    main()
