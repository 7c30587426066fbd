"""Benchmark the live weight sync against vLLM's own in-memory reload of the same tensors.

    python -m tools.bench_sync [--size-gb 0.6] [--bucket-mb 512] [--repeats 5] [--transport auto] [--thp]

Fabricates a Qwen2-shaped fp32 model of about ``--size-gb`` (``tools.make_tiny``; cached in
``--workdir``), converts it with hf2mcore, then runs two torchrun ranks: a TP=2 trainer whose
rank 0 also hosts a vLLM engine (started before the trainer's process group, see
``rl.rollout.vllm_engine``). Rank 0 keeps the checkpoint's HF tensors in memory. Each repeat
times, back to back (alternating which goes first):
  sync    ``WeightSync.sync``: gather the TP shards, undo the run-time layouts, convert to HF,
          load bucket by bucket, prove completeness;
  vllm    ``model_runner.reload_weights(weights_iterator=...)`` of the in-memory HF tensors:
          vLLM's own in-place reload, no gathering and no checks.
Two passes: times come from one with the normal allocator; peak extra memory (rank 0's
resident-set growth during each path) from one where glibc mmaps every allocation of 64 KiB or
more (``MALLOC_MMAP_THRESHOLD_``), so freed buffers leave the resident set at once. The engine's
prompt logprobs after a sync and after vLLM's reload must be bitwise equal. Prints one line per
repeat and, last, a JSON object: median times, ``ratio`` = the median over the repeats (at least
5) of sync / vllm, each pair timed back to back (also ``ratio_of_medians``, ``ratio_best``,
``ratio_worst``), CPU seconds of both paths (all trainer ranks for the sync) and ``cpu_ratio``,
peak extra memory in bytes and in buckets (``sync_peak_extra_buckets``, the receive buffers the
sync keeps between syncs included; ``sync_extra_over_vllm_buckets`` less vLLM's own reload's).
The machines are shared: wall times move by +-30 % or more between runs; on a loaded machine the
wall ratio tends to the CPU ratio (the sync's overlap needs a free core).

Leaves out: GPUs (same code, NCCL instead of gloo), EP/PP layouts (tests cover their
correctness). Without it the sync's cost relative to the engine's own reload is a guess.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HIDDEN, HEADS, KV_HEADS, INTER, VOCAB = 1024, 16, 4, 2816, 32768


def layers_for(size_gb: float) -> int:
    per_layer = HIDDEN * (HIDDEN + 2 * KV_HEADS * 64) + HIDDEN * HIDDEN + 3 * HIDDEN * INTER
    return max(2, round((size_gb * 1e9 / 4 - 2 * VOCAB * HIDDEN) / per_layer))


def prepare(workdir: Path, size_gb: float) -> tuple[Path, Path]:
    """(HF dir, hf2mcore dir) of the benchmark model, fabricated and converted once."""
    from convert import hf2mcore
    from tools.make_tiny import make_tiny

    layers = layers_for(size_gb)
    hf, mcore = workdir / f"qwen2-L{layers}-fp32", workdir / f"qwen2-L{layers}-fp32-mcore"
    if not (hf / "model.safetensors.index.json").is_file():
        make_tiny("qwen2", hf, dtype="fp32", num_hidden_layers=layers, vocab_size=VOCAB, hidden_size=HIDDEN,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=INTER,
                  max_window_layers=layers, progress=sys.stderr.isatty())
    if not (mcore / "latest_checkpointed_iteration.txt").is_file():
        hf2mcore.run(str(hf), str(mcore), overwrite=True)
    return hf, mcore


class PeakRSS:
    """Peak resident-set growth of this process while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.base = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self.extra = self.peak - self.base


def _vllm_reload(worker, items) -> float:
    t = time.perf_counter()
    worker.model_runner.reload_weights(weights_iterator=iter(items))
    return time.perf_counter() - t


# --------------------------------------------------------------------------- torchrun worker
def worker(a) -> None:
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    engine = None
    if rank == 0:
        from rl.rollout.vllm_engine import VLLMConfig, VLLMEngine

        engine = VLLMEngine(VLLMConfig(model=a.hf, dtype="float32", max_model_len=256,
                                       kv_cache_bytes=64 << 20, release_process_group=True))

    from runtime import megatron as rt
    from convert.formats import checkpoint_dir
    from mapping.registry import family_for
    from rl.sync.weight_sync import WeightSync

    rt.init_distributed(tp=2, seed=1)
    cfg = json.loads((Path(a.hf) / "config.json").read_text())
    m = family_for(cfg).read_config(cfg)
    model = rt.build_from(m, dtype=torch.float32, tp=2)
    model.load_state_dict(rt.load_checkpoint(model, checkpoint_dir(a.mcore)))
    sync = WeightSync(model, cfg, engine_dtype=torch.float32, bucket_bytes=a.bucket_mb << 20, transport=a.transport)
    items = _hf_in_memory(Path(a.hf)) if rank == 0 else None
    rows = []
    for rep in range(a.repeats + 1):  # repeat 0 warms both paths up; the order alternates
        first_sync = rep % 2 == 0
        if rank == 0 and not first_sync:
            vllm_s, mem_vllm = _timed_vllm_reload(engine, items)
        dist.barrier()
        with PeakRSS() as mem_sync:
            t, cpu = time.perf_counter(), time.process_time()
            stats = sync.sync(engine)
            dist.barrier()
            sync_s, cpu = time.perf_counter() - t, time.process_time() - cpu
        cpus = [None] * dist.get_world_size()
        dist.all_gather_object(cpus, cpu)  # CPU seconds of every rank (all threads) during the sync
        if rank == 0:
            if first_sync:
                vllm_s, mem_vllm = _timed_vllm_reload(engine, items)
            # the receive buffers kept between syncs were resident before the sync began
            row = dict(repeat=rep, sync_s=sync_s, vllm_s=vllm_s, sync_extra=mem_sync.extra + stats.kept_bytes,
                       vllm_extra=mem_vllm.extra, accounted=stats.peak_held_bytes, sync_cpu=sum(cpus),
                       vllm_cpu=mem_vllm.cpu, **stats.timings)
            if rep:
                rows.append(row)
            print(f"repeat {rep}{' (warm-up)' if not rep else ''}: sync {sync_s:.3f} s "
                  f"({', '.join(f'{k} {v:.3f}' for k, v in stats.timings.items())}), vLLM reload {vllm_s:.3f} s, "
                  f"CPU s sync {sum(cpus):.3f} / vLLM {mem_vllm.cpu:.3f}, "
                  f"extra RSS sync {mem_sync.extra / 2**20:.0f} MiB / vLLM {mem_vllm.extra / 2**20:.0f} MiB", flush=True)
    if rank == 0:
        print(json.dumps(_summary(rows, stats, sync, engine, items, model_bytes=sum(t.nbytes for _, t in items))),
              flush=True)
    else:
        sync.sync(None)
    dist.barrier()


def _timed_vllm_reload(engine, items):
    with PeakRSS() as mem:
        cpu = time.process_time()
        seconds = engine.llm.collective_rpc(_vllm_reload, args=(items,))[0]
        mem.cpu = time.process_time() - cpu
    return seconds, mem


def _hf_in_memory(hf: Path) -> list:
    from safetensors.torch import load_file

    items = []
    for f in sorted(hf.glob("*.safetensors")):
        items += [(n, t.clone()) for n, t in load_file(str(f)).items()]  # clone: off the mmap
    return items


def _summary(rows, stats, sync, engine, items, model_bytes) -> dict:
    seqs = [[1, 5, 7, 9, 11, 300, 2, 17, 45, 99]]
    after_vllm = engine.prompt_logprobs(seqs)[0]
    engine.llm.reset_prefix_cache()
    sync.sync(engine)
    after_sync = engine.prompt_logprobs(seqs)[0]
    med = {k: statistics.median(r[k] for r in rows)
           for k in ("sync_s", "vllm_s", "sync_extra", "vllm_extra", "sync_cpu", "vllm_cpu")}
    ratios = [r["sync_s"] / r["vllm_s"] for r in rows]  # each repeat's pair ran back to back
    bucket = sync.bucket_bytes
    return dict(model_bytes=model_bytes, tensors=len(items), tp=2, transport=sync.transport,
                shared_buffer_writers=sorted(sync.direct), buckets=stats.buckets, bucket_bytes=bucket,
                repeats=len(rows), sync_s=med["sync_s"], vllm_reload_s=med["vllm_s"],
                ratio=statistics.median(ratios), ratio_of_medians=med["sync_s"] / med["vllm_s"],
                ratio_best=min(ratios), ratio_worst=max(ratios), sync_cpu_s=med["sync_cpu"],
                vllm_reload_cpu_s=med["vllm_cpu"], cpu_ratio=med["sync_cpu"] / med["vllm_cpu"],
                sync_peak_extra_bytes=int(med["sync_extra"]),
                vllm_reload_peak_extra_bytes=int(med["vllm_extra"]),
                sync_peak_extra_buckets=med["sync_extra"] / bucket,
                sync_extra_over_vllm_buckets=(med["sync_extra"] - med["vllm_extra"]) / bucket,
                sync_kept_bytes=stats.kept_bytes, sync_accounted_peak_bytes=stats.peak_held_bytes,
                same_logprobs_as_vllm_reload=bool(torch_equal(after_sync, after_vllm)))


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


# --------------------------------------------------------------------------- CLI
MEMORY_KEYS = ("sync_peak_extra_bytes", "vllm_reload_peak_extra_bytes", "sync_peak_extra_buckets",
               "sync_extra_over_vllm_buckets", "sync_kept_bytes", "sync_accounted_peak_bytes")


def _run_worker(a, hf: Path, mcore: Path, exact_rss: bool):
    """One torchrun pass. Timing runs with the normal allocator; the memory pass makes glibc
    mmap every allocation of 64 KiB or more, so freed buffers leave the resident set at once."""
    from runtime.net import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "tools.bench_sync", "--worker", "--hf", str(hf), "--mcore", str(mcore),
           "--bucket-mb", str(a.bucket_mb), "--repeats", str(a.repeats), "--transport", a.transport]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if exact_rss:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if a.thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("repeat", "{"))]
    if r.returncode or not lines or not lines[-1].startswith("{"):
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-6000:])
        print(f"bench_sync: the torchrun worker failed (exit {r.returncode}); its output is above", file=sys.stderr)
        return None
    label = "memory pass" if exact_rss else "timing pass"
    print("\n".join(f"{label} {ln}" for ln in lines[:-1]), flush=True)
    return json.loads(lines[-1])
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench_sync", description=__doc__.split("\nLeaves out")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Last line of output: a JSON object (see the module docstring).")
    p.add_argument("--size-gb", type=float, default=0.6, help="model size in fp32 (default 0.6)")
    p.add_argument("--bucket-mb", type=int, default=512, help="sync bucket bound, MiB (default 512)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (default 5)")
    p.add_argument("--transport", choices=("auto", "p2p", "shm"), default="auto",
                   help="WeightSync transport (default auto: the peer rank writes into shared buffers on CPU)")
    p.add_argument("--thp", action="store_true",
                   help="THP_MEM_ALLOC_ENABLE=1 in the workers: PyTorch asks for transparent huge pages "
                        "(fewer page faults on fresh buffers; helps both paths)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench_sync",
                   help="where the fabricated model and its conversion are cached")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hf", help=argparse.SUPPRESS)
    p.add_argument("--mcore", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.repeats < 5:
        p.error(f"--repeats {a.repeats}: the ratio is a median over repeats; give at least 5")
    if a.worker:
        worker(a)
        return 0
    a.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    hf, mcore = prepare(a.workdir, a.size_gb)
    print(f"model ready: {hf} ({time.time() - t0:.0f} s)", flush=True)
    timing = _run_worker(a, hf, mcore, exact_rss=False)
    memory = _run_worker(a, hf, mcore, exact_rss=True)
    if timing is None or memory is None:
        return 1
    result = dict(timing, **{k: memory[k] for k in MEMORY_KEYS})
    print(f"bench_sync: {result['model_bytes'] / 1e9:.2f} GB, TP=2 -> vLLM: sync {result['sync_s']:.3f} s vs "
          f"vLLM reload {result['vllm_reload_s']:.3f} s (median ratio {result['ratio']:.2f} over "
          f"{result['repeats']} repeats, {result['ratio_best']:.2f}-{result['ratio_worst']:.2f}); "
          f"peak extra memory {result['sync_peak_extra_buckets']:.2f} buckets "
          f"({result['sync_extra_over_vllm_buckets']:.2f} over vLLM's own reload); "
          f"{time.time() - t0:.0f} s total", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
