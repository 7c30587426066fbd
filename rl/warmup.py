"""Supervised warm-up of a fabricated tiny model, so that GRPO has rewards to learn from.

A randomly initialised model never writes a `\\boxed{}` answer, so its reward is always 0 and GRPO's
advantages are all 0: nothing to learn. A short warm-up on teacher-forced answers `\\boxed{N}` and the
end-of-turn token (transformers, in the driver, before conversion) gives it a format and some
arithmetic; GRPO then has groups of mixed rewards. Half of the warm-up answers (`revise_share`) may be
followed by a second, wrong answer (`\\boxed{N} \\boxed{N+d}`), the way sampled base-model outputs often
second-guess themselves; the reward reads the last box, so those score 0. The coin flip comes after
the first answer, so the warmed-up model revises on about that share of problems it has never seen,
and GRPO has a habit to unlearn from rewards alone (what tools.demo_rl shows).

    examples = sft_examples(rows, tokenizer, end_id, revise_share=0.5, seed=0)
    warm_up(hf_dir, out_dir, examples, steps=300, batch=64, lr=1e-3, seed=0)

In the trainer: `model.fabricate_warmup: {steps: 300, revise_share: 0.5}` (fields of `WarmupConfig`)
warms the fabricated model up on the training split of the run's data before hf2mcore converts it.
Leaves out: evaluation (tools.demo_rl measures accuracy with transformers), real SFT data.
Shape legend: B examples, S longest prompt + answer.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rl.batch import encode_prompts


@dataclass(frozen=True)
class WarmupConfig:
    steps: int = 0
    """optimizer steps (0: no warm-up)"""
    batch: int = 64
    """examples per step"""
    lr: float = 1e-3
    """peak learning rate (50 warm-up steps, cosine to 0)"""
    revise_share: float = 0.0
    """share of answers followed by a second, wrong boxed answer (a habit for GRPO to unlearn)"""

    def __post_init__(self):
        if self.steps < 0 or self.batch < 1 or self.lr <= 0 or not 0.0 <= self.revise_share <= 1.0:
            raise ValueError(f"model.fabricate_warmup: {self}: need steps >= 0, batch >= 1, lr > 0, 0 <= revise_share <= 1")


def end_of_turn_id(tokenizer) -> int:
    """The chat template's end-of-turn token (`<|im_end|>`), else the tokenizer's EOS."""
    tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else tokenizer.eos_token_id


def sft_examples(rows, tokenizer, end_id: int, revise_share: float = 0.0, seed: int = 0):
    """(prompt ids, target ids, ground truth) per row: `\\boxed{N}` and end of turn, for a
    `revise_share` of the rows followed by a second, wrong answer (module docstring)."""
    prompts, _ = encode_prompts(rows, tokenizer, 512)
    g = torch.Generator().manual_seed(seed)
    revise = (torch.rand(len(prompts), generator=g) < revise_share).tolist()
    deltas = torch.randint(1, 10, (len(prompts),), generator=g) * (torch.randint(0, 2, (len(prompts),), generator=g) * 2 - 1)
    out = []
    for p, rev, d in zip(prompts, revise, deltas.tolist()):
        text = "\\boxed{" + p.ground_truth + "}" + (" \\boxed{" + str(int(p.ground_truth) + d) + "}" if rev else "")
        out.append((list(p.ids), tokenizer.encode(text, add_special_tokens=False) + [end_id], p.ground_truth))
    return out


def batch_of(examples) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_BS, labels_BS): prompt + answer right-padded; labels -100 except on the answer."""
    S = max(len(p) + len(a) for p, a, _ in examples)
    ids = torch.zeros(len(examples), S, dtype=torch.long)
    labels = torch.full((len(examples), S), -100, dtype=torch.long)
    for i, (p, a, _) in enumerate(examples):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
    return ids, labels


def warm_up(hf_dir: Path, out_dir: Path, examples, *, steps: int, batch: int, lr: float, seed: int):
    """Train the HF model in `hf_dir` on `examples` and save it (weights, tokenizer files, generation
    config) to `out_dir`; returns the model (train mode off)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    moe = any(config.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    # transformers 5 picks batched expert matmuls for MoE by default: ~20x slower than the per-expert
    # loop for a tiny model on CPU (3 s vs 0.17 s a step here)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 **({"experts_implementation": "eager"} if moe else {}))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(examples), (batch,), generator=g).tolist()
        ids, labels = batch_of([examples[i] for i in idx])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 100 == 0 or step == steps:
            print(f"warm-up step {step}/{steps} | loss {loss.item():.3f} | {time.time() - t0:.0f} s", flush=True)
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(out_dir)
    if Path(hf_dir, "generation_config.json").is_file():
        shutil.copy(Path(hf_dir) / "generation_config.json", out_dir / "generation_config.json")
    return model


def warm_up_fabricated(source: Path, cfg: WarmupConfig, rows, seed: int) -> None:
    """Warm the fabricated checkpoint in `source` up in place, on the training `rows`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    examples = sft_examples(rows, tokenizer, end_of_turn_id(tokenizer), cfg.revise_share, seed)
    tmp = source.with_name(source.name + ".warmup")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"warming {source} up: {cfg.steps} supervised steps on {len(examples)} examples", flush=True)
    warm_up(source, tmp, examples, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, seed=seed)
    shutil.rmtree(source)
    tmp.rename(source)
