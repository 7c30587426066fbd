"""GRPO on a tiny MoE that visibly learns on a CPU, with and without what issue 20 added, side by side.

    python -m tools.demo_rl [--out runs/demo_rl] [--sft-steps 600] [--grpo-steps 40] [--seed 0]

1. Fabricates a 2-layer Qwen3-MoE (tools.make_tiny, 8 experts top-2, fp32) and the synthetic arithmetic
   task (rl.data.synthetic: "Compute $a + b$." with a, b < 100), and warms it up with transformers on
   teacher-forced answers (rl.warmup): half of them followed by a second, wrong answer, which the reward
   (last box) scores 0, so GRPO has a habit to unlearn from rewards alone, and arithmetic to sharpen.
2. Converts it once (convert.hf2mcore) and runs rl/train.py twice from it on the same seed, with
   rl/configs/tiny_moe.yaml (vLLM-CPU rollouts, the MCore policy, live weight sync, Ray; rollout routing
   replay, masked IS, dynamic sampling, overlong filtering, packing):
     async  one-step-ahead generation on: the engine samples step k+1 while the trainer trains step k;
     sync   the same without it: sample, then train.
3. Routing replay on a copy whose router rows are near-ties (`near_tie_routers`), a few synchronous steps:
   on the warmed-up model vLLM and Megatron, both in fp32, almost never route differently, so R3 has
   little to fix there; with near-ties the last bits of each side's arithmetic pick the experts.
Printed, side by side: held-out greedy accuracy before GRPO and after each run (transformers on the
exported policy, independently of vLLM and Megatron); the train/rollout log-prob mismatch of the same
batches with and without replay, and how often the trainer's own routing agreed with vLLM's; mean step
time with and without overlap, and the overlap itself. Curves: RUN/{async,sync}/curves.png.
Why the mismatch differs between the runs: with async on, every batch was sampled by the previous
policy, so the trainer/rollout difference is mostly that one optimizer step (the masked IS correction
acts on it) and the routing "disagreement" is mostly the policy having moved; the near-tie run shows
what replay removes when the weights are the same.
Leaves out: real math data (the GPU recipes in rl/configs/). A benchmark, not a test (tests/test_train.py runs
tiny_moe.yaml against a time budget).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "rl/configs/tiny_moe.yaml"


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
    return sum(compute_scores(texts, truths)[0]) / len(texts), sum(t.count("\\boxed{") > 1 for t in texts) / len(texts)


def load_hf(path: Path):
    """A transformers model for greedy evaluation (per-expert loop: transformers 5's batched expert
    matmuls are ~20x slower for a tiny MoE on CPU)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")


def near_tie_routers(hf_dir: Path, delta: float = 1e-5, seed: int = 0) -> int:
    """Make each MoE router's expert scores near-ties, in place: within every run of three experts
    (0-2, 3-5, ...) the second and third gate rows become the first plus `delta` x its mean |w| of
    noise, so a token's top-k often picks among near-equal scores and the last bits of fp32 arithmetic
    decide (vLLM's kernels and Megatron's may decide differently: what routing replay is for). The
    experts themselves stay different, so a different pick changes the output. Returns the routers
    changed (gate weights `...layers.L.mlp.gate.weight` / `block_sparse_moe.gate.weight`)."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    touched = 0
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        tensors = load_file(f)
        for name, w in tensors.items():
            if re.search(r"layers\.\d+\.(mlp|block_sparse_moe)\.gate\.weight$", name):
                w = w.clone()
                for first in range(0, w.shape[0] - 2, 3):
                    for j in (first + 1, first + 2):
                        noise = torch.randn(w.shape[1], generator=g, dtype=torch.float32)
                        w[j] = (w[first].float() + delta * w[first].float().abs().mean() * noise).to(w.dtype)
                tensors[name] = w
                touched += 1
        save_file(tensors, str(f), metadata={"format": "pt"})
    return touched


def grpo(out: Path, model: Path, name: str, *overrides) -> tuple[list[dict], float]:
    """One rl/train.py run of tiny_moe.yaml on the converted `model`; (metrics rows, minutes)."""
    from rl.config import load_config
    from rl.metrics import read
    from rl.train import train

    cfg = load_config(CONFIG, [f"model.path={model}", f"run.dir={out / name}", *overrides])
    t = time.time()
    rows = read(train(cfg))
    return rows, (time.time() - t) / 60


def mean(rows: list[dict], key: str, skip_first: bool = False):
    """Mean over the training steps (from step 2 with `skip_first`: step 1 samples its batch inline)."""
    values = [r[key] for r in rows if r["step"] >= 1 + skip_first and r.get(key) is not None]
    return statistics.mean(values) if values else None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m tools.demo_rl", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo_rl"), help="run directory (replaced)")
    ap.add_argument("--sft-steps", type=int, default=600, help="supervised warm-up steps (default %(default)s)")
    ap.add_argument("--sft-lr", type=float, default=2e-3, help="warm-up learning rate (default %(default)s)")
    ap.add_argument("--grpo-steps", type=int, default=40, help="GRPO steps of each run (default %(default)s)")
    ap.add_argument("--revise-share", type=float, default=0.5,
                    help="share of warm-up answers followed by a wrong second answer (default %(default)s)")
    ap.add_argument("--near-tie-delta", type=float, default=1e-6,
                    help="relative noise between near-tied router rows in the R3 comparison (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from convert import hf2mcore
    from rl.config import load_config
    from rl.data.synthetic import ArithConfig, make_splits
    from rl.warmup import end_of_turn_id, sft_examples, warm_up
    from tools.make_tiny import make_tiny

    t0 = time.time()
    shutil.rmtree(args.out, ignore_errors=True)
    base = load_config(CONFIG)
    hf_dir = make_tiny("qwen3_moe", args.out / "init_hf", dtype="fp32", seed=args.seed, **base.model.fabricate_overrides)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    splits = make_splits(ArithConfig(**base.data.synthetic))
    end = end_of_turn_id(tokenizer)
    train_ex = sft_examples(splits["train"], tokenizer, end, args.revise_share, args.seed)
    test_ex = sft_examples(splits["test"], tokenizer, end)
    sft_dir = args.out / "model_hf"  # rl.prepare starts the engine from <model>_hf
    warm_up(hf_dir, sft_dir, train_ex, steps=args.sft_steps, batch=64, lr=args.sft_lr, seed=args.seed)
    acc0, revised0 = greedy_accuracy(load_hf(sft_dir), test_ex, tokenizer)
    print(f"after warm-up ({time.time() - t0:.0f} s): held-out greedy accuracy {acc0:.3f}, revised answers {revised0:.2f}",
          flush=True)
    hf2mcore.run(str(sft_dir), str(args.out / "model"), overwrite=True)
    common = [f"run.steps={args.grpo_steps}", f"run.seed={args.seed}", f"run.eval_every={args.grpo_steps}",
              "run.checkpoint_every=0"]
    result = {}
    for name, switch in (("async", "true"), ("sync", "false")):
        rows, minutes = grpo(args.out, args.out / "model", name, *common, f"rollout.async_generation={switch}")
        acc, revised = greedy_accuracy(load_hf(args.out / name / "hf"), test_ex, tokenizer)
        result[name] = {"accuracy_after": acc, "revised_after": revised, "minutes": minutes,
                        "step_s": mean(rows, "timing/step_s", skip_first=True), "overlap_s": mean(rows, "timing/overlap_s"),
                        "mismatch_r3": mean(rows, "mismatch/logprob_abs_diff_mean"),
                        "mismatch_no_r3": mean(rows, "mismatch/logprob_abs_diff_mean_no_replay"),
                        "routing_agreement": mean(rows, "routing/replay_agreement")}
    ties = args.out / "near_ties"  # the warmed-up weights, routers made near-ties, converted anew
    shutil.copytree(sft_dir, ties.with_name("near_ties_hf"))
    near_tie_routers(ties.with_name("near_ties_hf"), args.near_tie_delta, args.seed)
    hf2mcore.run(str(ties.with_name("near_ties_hf")), str(ties), overwrite=True)
    rows, _ = grpo(args.out, ties, "near_ties_run", f"run.seed={args.seed}", "run.steps=3", "run.eval_every=0",
                   "run.checkpoint_every=0", "run.export_hf=false", "rollout.async_generation=false")
    result["near_ties"] = {"mismatch_r3": mean(rows, "mismatch/logprob_abs_diff_mean"),
                           "mismatch_no_r3": mean(rows, "mismatch/logprob_abs_diff_mean_no_replay"),
                           "routing_agreement": mean(rows, "routing/replay_agreement")}
    summary = {"accuracy_before": acc0, "revised_before": revised0, **result, "seed": args.seed,
               "sft_steps": args.sft_steps, "grpo_steps": args.grpo_steps, "total_minutes": (time.time() - t0) / 60}
    print(table(summary))
    print(json.dumps(summary))
    return summary


def table(s: dict) -> str:
    a, b, t = s["async"], s["sync"], s["near_ties"]
    rows = [("", "async (overlap on)", "sync (overlap off)"),
            ("held-out accuracy before GRPO", f"{s['accuracy_before']:.3f}", f"{s['accuracy_before']:.3f}"),
            (f"held-out accuracy after {s['grpo_steps']} steps", f"{a['accuracy_after']:.3f}", f"{b['accuracy_after']:.3f}"),
            ("revised answers before -> after", f"{s['revised_before']:.2f} -> {a['revised_after']:.2f}",
             f"{s['revised_before']:.2f} -> {b['revised_after']:.2f}"),
            ("mean step time (s)", f"{a['step_s']:.2f}", f"{b['step_s']:.2f}"),
            ("generation overlapped with training (s/step)", f"{a['overlap_s'] or 0:.2f}", "-"),
            ("log-prob mismatch, R3 on", f"{a['mismatch_r3']:.2e}", f"{b['mismatch_r3']:.2e}"),
            ("log-prob mismatch, same batches without R3", f"{a['mismatch_no_r3']:.2e}", f"{b['mismatch_no_r3']:.2e}"),
            ("trainer routing == vLLM routing (tokens)", f"{a['routing_agreement']:.1%}", f"{b['routing_agreement']:.1%}"),
            ("near-tied routers, sync: mismatch R3 on / off", f"{t['mismatch_r3']:.2e} / {t['mismatch_no_r3']:.2e}",
             f"routing agreement {t['routing_agreement']:.1%}"),
            ("minutes (GRPO run)", f"{a['minutes']:.1f}", f"{b['minutes']:.1f}")]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]}" for r in rows) + f"\n(seed {s['seed']}, {s['total_minutes']:.1f} min in all)"


if __name__ == "__main__":
    main()
