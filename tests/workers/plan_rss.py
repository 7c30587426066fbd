"""One process: build what the trainer builds for a tiny policy on CPU and report how its resident memory
grew, for tests/test_rl_plan.py to hold rl.plan's trainer plan against.

What it builds (the Megatron-Core training stack, as issue 25 moves the trainer onto it): the GPTModel of the
given config.json with real (random) weights in the given dtype, wrapped in Megatron-Core's
``DistributedDataParallel(grad_reduce_in_fp32=True)``, ``get_megatron_optimizer`` (Adam, with or without the
distributed optimizer) after ``runtime.patches`` ``megatron_train.AT_TRAIN``; then ``--steps`` times: a forward
of a [micro_batch, seq] batch through ``rl.logprobs.sequence_logprobs`` (log-probs and entropies), a backward
and an optimizer step (from the second on, the optimizer state exists while activations are alive: the
steady state). Prints one JSON line: the RSS before the model was built, at each stage, and the process's
peak (``VmHWM`` of /proc/self/status: ``getrusage``'s ``ru_maxrss`` is not this process's own, since Linux
carries the parent's peak across the exec that started it: spawned by CI's test session, a run that grows
0.39 GB reported 1.33 GB of growth), and the bytes of optimizer state the optimizer holds, in bytes. Run it with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` so
that glibc returns freed blocks and RSS follows the live tensors rather than the allocator's retention.
(bf16 on CPU grows by about twice the bf16 weights every step with no tensor alive to show for it, a native
cache of the CPU kernels: measure fp32.)

    python tests/workers/plan_rss.py --config CONFIG.json --dtype fp32 --micro-batch 4 --seq 256 [--replicated]
"""
import argparse
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """The high-water mark of this process's own address space (kB in /proc), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def optimizer_state_bytes(opt) -> int:
    """Bytes of the optimizer state this rank holds: Adam's moments and fp32 master copies of 16-bit params."""
    import torch

    total = 0
    for o in getattr(opt, "chained_optimizers", [opt]):
        for state in o.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim())
        for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):  # distributed / replicated
            total += sum(p.numel() * p.element_size() for g in getattr(o, name, []) for p in g)
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--replicated", action="store_true", help="without the distributed optimizer")
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from mapping.registry import family_for
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from rl.logprobs import sequence_logprobs
    from runtime import megatron as rt
    from runtime import patches

    cfg = json.loads(Path(a.config).read_text())
    m = family_for(cfg).read_config(cfg)
    rt.init_distributed()
    patches.apply(patches.megatron_train.AT_TRAIN)
    dtype = rt.DTYPES[a.dtype]
    tokens_BS = torch.randint(0, m.vocab_size, (a.micro_batch, a.seq))
    marks = {"before": rss()}

    model = rt.build_from(m, dtype=dtype)
    marks["model"] = rss()
    distributed = not a.replicated
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, bf16=dtype == torch.bfloat16,
                                                 params_dtype=dtype, use_distributed_optimizer=distributed,
                                                 clip_grad=1.0), [ddp])
    marks["optimizer"] = rss()
    for step in range(1, a.steps + 1):  # from step 2 on the optimizer state exists: the steady state
        logp_BT, ent_BT = sequence_logprobs(ddp, tokens_BS, vocab_size=m.vocab_size)
        marks[f"forward{step}"] = rss()
        (-(logp_BT.float().mean()) - 0.01 * ent_BT.float().mean()).backward()
        ddp.finish_grad_sync()
        marks[f"backward{step}"] = rss()
        ok, grad_norm, _ = opt.step()
        ddp.zero_grad_buffer()
        del logp_BT, ent_BT
        marks[f"step{step}"] = rss()
    marks["peak"] = peak_rss()
    marks["optimizer_state"] = optimizer_state_bytes(opt)
    params = sum(x.numel() for x in model.parameters())
    print(json.dumps({**marks, "params": params, "stepped": bool(ok), "grad_norm": float(grad_norm)}))
    rt.destroy_distributed()


if __name__ == "__main__":
    main()
