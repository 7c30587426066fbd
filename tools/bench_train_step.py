"""Benchmark the trainer's optimizer step on Megatron-Core's stack against the path it replaced.

    python -m tools.bench_train_step [--family qwen3_moe] [--layers 4] [--repeats 5] [--json-out FILE]

On a fabricated MoE policy (``tools.make_tiny``, fp32, converted with hf2mcore), one GRPO mini-batch
(16 rows, micro-batches of 4) is trained, side by side in the same processes, by
  megatron  rl.policy: MCore DDP + the distributed optimizer + the pipeline schedule (what rl/train.py
            runs), and
  torch     the former path (rl/optim.py, deleted when the trainer moved onto MCore): the same model
            without DDP, each micro-batch's loss backward, gradients summed over data parallel by one
            flattened all-reduce, clip_grad_norm_, torch.optim.AdamW with the state on every rank.
Both allocate their optimizer state before timing (one step first), both run the same micro-batches and
the same loss; times are the median of ``--repeats`` steps, alternating which goes first. It runs at
dp=1 in this process and at dp=2 under torchrun (2 ranks), and prints, per rank count, the step times
and their ratio, and the optimizer state bytes per rank (Adam moments plus fp32 master copies the
optimizer owns): with the distributed optimizer dp=2 must hold about half of dp=1's, the torch path all
of it. Last line: one JSON object with every figure.

Leaves out: GPUs and bf16 (fp32 on CPU, where master copies are the parameters themselves), pipeline
stages (their correctness is tests/test_policy.py's). Without it the claim "half the optimizer memory
per rank at dp=2" would be arithmetic, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS, MICRO, LENGTH = 16, 4, 48


def prepare(workdir: Path, family: str, layers: int) -> Path:
    from convert import hf2mcore
    from tools.make_tiny import make_tiny

    hf, mcore = workdir / f"{family}-L{layers}", workdir / f"{family}-L{layers}-mcore"
    if not (mcore / "latest_checkpointed_iteration.txt").is_file():
        make_tiny(family, hf, dtype="fp32", num_hidden_layers=layers)
        hf2mcore.run(str(hf), str(mcore), overwrite=True)
    return mcore


def batch(vocab: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    lengths_B = torch.randint(LENGTH // 2, LENGTH + 1, (ROWS,), generator=g)
    tokens_BS = torch.randint(5, vocab, (ROWS, LENGTH), generator=g)
    mask_BT = torch.arange(LENGTH - 1)[None] < (lengths_B[:, None] - 1)
    mask_BT[:, :4] = False
    return dict(tokens_BS=tokens_BS, lengths_B=lengths_B, mask_BT=mask_BT, adv_B=torch.randn(ROWS, generator=g),
                old_logp_BT=-3.0 + 0.1 * torch.randn(ROWS, LENGTH - 1, generator=g))


class TorchPath:
    """The former optimizer path, in plain torch (module docstring)."""

    def __init__(self, model_dir: str, sec, optim):
        import torch

        from rl.policy import load_weights, read_model_config
        from rl.stack import build_chunks

        _, self.m = read_model_config(model_dir)
        self.model = build_chunks(self.m, sec, torch.float32)[0]
        load_weights([self.model], model_dir)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW([{"params": [p for p in self.params if p.dim() > 1]},
                                      {"params": [p for p in self.params if p.dim() <= 1], "weight_decay": 0.0}],
                                     lr=optim.lr, eps=optim.eps, weight_decay=optim.weight_decay)
        self.clip = optim.grad_clip

    def step(self, batch: dict, loss_cfg) -> None:
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from rl import schedule
        from rl.grpo import grpo_loss
        from rl.logprobs import sequence_logprobs

        counts = dict(num_tokens=float(batch["mask_BT"].sum()), num_seqs=float(ROWS))
        self.opt.zero_grad(set_to_none=True)
        for mb in schedule.micro_batches(batch, MICRO, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(),
                                         False):
            d = mb.data
            logp, ent = sequence_logprobs(self.model, d["tokens_BS"], d["lengths_B"], vocab_size=self.m.vocab_size)
            loss, _ = grpo_loss(loss_cfg, logp_BT=logp, adv_B=d["adv_B"], mask_BT=d["mask_BT"],
                                old_logp_BT=d["old_logp_BT"], entropy_BT=ent.detach(), **counts)
            loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        if dist.get_world_size() > 1:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(r)
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values() if t.dim())


def megatron_state_bytes(policy) -> int:
    """Adam moments (and fp32 master copies the optimizer owns) on this rank."""
    inner = [o.optimizer for o in getattr(policy.stack.optimizer, "chained_optimizers", [policy.stack.optimizer])]
    return sum(t.numel() * t.element_size() for opt in inner for s in opt.state.values() for t in s.values()
               if hasattr(t, "dim") and t.dim())


def run_rank(model_dir: str, repeats: int) -> dict:
    """Both paths on this rank (collective over the current world): median step seconds and state bytes."""
    import torch
    import torch.distributed as dist

    from runtime import megatron as rt
    from rl.config import ModelSection, OptimSection
    from rl.grpo import LossConfig
    from rl.policy import Policy

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rt.init_distributed(seed=0)
    sec, optim, loss_cfg = ModelSection(dp=world), OptimSection(lr=1e-5, grad_clip=1.0), LossConfig()
    policy, plain = Policy(model_dir, sec, optim=optim, total_steps=repeats + 1), TorchPath(model_dir, sec, optim)
    data = batch(policy.m.vocab_size)
    paths = {"megatron": lambda: policy.train_mini_batch(data, loss_cfg, micro_batch_size=MICRO),
             "torch": lambda: plain.step(data, loss_cfg)}
    for fn in paths.values():
        fn()  # optimizer state allocated, caches warm
    times = {k: [] for k in paths}
    for i in range(repeats):
        for name in (("megatron", "torch") if i % 2 == 0 else ("torch", "megatron")):
            dist.barrier()
            t = time.perf_counter()
            paths[name]()
            dist.barrier()
            times[name].append(time.perf_counter() - t)
    out = {"world": world, "megatron_step_s": statistics.median(times["megatron"]),
           "torch_step_s": statistics.median(times["torch"]), "megatron_state_bytes": megatron_state_bytes(policy),
           "torch_state_bytes": plain.state_bytes()}
    rt.destroy_distributed()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_train_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="qwen3_moe", help="tiny family to fabricate (default: qwen3_moe)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the fabricated model")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per path (median reported)")
    ap.add_argument("--workdir", default=None, help="where the model is fabricated (default: a temp dir)")
    ap.add_argument("--json-out", default=None, help="append the JSON result line to this file")
    ap.add_argument("--rank-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rank_worker:  # one torchrun rank
        got = run_rank(a.rank_worker, a.repeats)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(got), flush=True)
        return
    from runtime.net import free_port

    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="bench_train_step-"))
    model = prepare(workdir, a.family, a.layers)
    results = []
    for world in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
               str(free_port()), "-m", "tools.bench_train_step", "--rank-worker", str(model), "--repeats", str(a.repeats)]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           cwd=Path(__file__).resolve().parents[1])
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if r.returncode or line is None:
            sys.exit(f"error: the dp={world} run failed (exit {r.returncode}): {r.stderr[-2000:]}")
        results.append(json.loads(line[len("RESULT "):]))
    for res in results:
        print(f"dp={res['world']}: step megatron {res['megatron_step_s']:.3f} s, torch {res['torch_step_s']:.3f} s "
              f"(megatron/torch {res['megatron_step_s'] / res['torch_step_s']:.2f}x); optimizer state per rank "
              f"megatron {res['megatron_state_bytes'] / 2**20:.1f} MiB, torch {res['torch_state_bytes'] / 2**20:.1f} MiB")
    one, two = results
    summary = {"family": a.family, "layers": a.layers, "rows": ROWS, "micro_batch": MICRO, "results": results,
               "megatron_state_dp2_over_dp1": two["megatron_state_bytes"] / one["megatron_state_bytes"],
               "torch_state_dp2_over_dp1": two["torch_state_bytes"] / one["torch_state_bytes"]}
    print(f"optimizer state per rank, dp=2 over dp=1: megatron {summary['megatron_state_dp2_over_dp1']:.3f}, "
          f"torch {summary['torch_state_dp2_over_dp1']:.3f}")
    print(json.dumps(summary))
    if a.json_out:
        with open(a.json_out, "a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
