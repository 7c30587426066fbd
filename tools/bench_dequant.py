"""Benchmark the CPU FP8 -> BF16 block dequant against torch ``copy_`` and the plain reference.

    python -m tools.bench_dequant                      # 8192 x 16384, 2 threads, 5 repeats
    python -m tools.bench_dequant --rows 7168 --cols 2048 --repeat 10

What it measures, in one run, on the same random weight (random bytes, so NaN codes included)
and random scales: bytes per second where bytes = 1 (fp8 in) + 2 (bf16 out) per element plus the
fp32 scales, for
- ``copy_``: torch copying a preallocated uint8 buffer of half those bytes (read + write = the
  same bytes): what the memory system gives;
- ``cpu``: ``kernels.fp8_block_dequant(..., impl="cpu", out=...)`` into a preallocated output;
- ``reference``: ``fp8_block_dequant_reference`` (``x.float() * scale`` then the bf16 cast).
The three are timed round-robin, ``--repeat`` rounds after one warm-up, best round kept (the
machines are shared: the best round is the least disturbed). It also checks the cpu path's
output equals the reference's bit for bit. The last line is a JSON object with the figures and
the ratios (``cpu_vs_copy`` is the figure the FP8 issue asks to be >= 0.3 on 2 threads).

Pick sizes well beyond the last-level cache (the default moves ~400 MB): a weight that fits in
cache flatters ``copy_`` and the ratio then says little about a real checkpoint cast.
What it leaves out: the Triton path (no GPU here) and file I/O (see tools.fp8_cast_bf16's summary).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from kernels import fp8_block_dequant
from kernels.fp8_reference import fp8_block_dequant_reference, scale_shape


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench_dequant", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192, help="weight rows M (default 8192)")
    p.add_argument("--cols", type=int, default=16384, help="weight columns N (default 16384)")
    p.add_argument("--block", type=int, default=128, help="scale block size (default 128, DeepSeek's)")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds after one warm-up (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch (and numba) threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    M, N = args.rows, args.cols
    g = torch.Generator().manual_seed(args.seed)
    w_MN = torch.randint(0, 256, (M, N), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    scale_mn = torch.exp2(torch.empty(scale_shape((M, N), args.block)).uniform_(-20, 0, generator=g))
    nbytes = 3 * M * N + 4 * scale_mn.numel()
    src = torch.randint(0, 256, (nbytes // 2,), dtype=torch.uint8, generator=g)
    dst = torch.empty_like(src)
    out_MN = torch.empty(M, N, dtype=torch.bfloat16)
    methods = {
        "copy": lambda: dst.copy_(src),
        "cpu": lambda: fp8_block_dequant(w_MN, scale_mn, args.block, out=out_MN, impl="cpu"),
        "reference": lambda: fp8_block_dequant_reference(w_MN, scale_mn, args.block),
    }
    best = {name: _timed(fn) for name, fn in methods.items()}  # warm-up (numba compiles or loads its cache)
    bitwise = torch.equal(out_MN.view(torch.int16), fp8_block_dequant_reference(w_MN, scale_mn, args.block).view(torch.int16))
    best = {name: float("inf") for name in methods}
    for _ in range(args.repeat):
        for name, fn in methods.items():
            best[name] = min(best[name], _timed(fn))
    gbps = {name: nbytes / t / 1e9 for name, t in best.items()}
    return {"rows": M, "cols": N, "block": args.block, "threads": args.threads, "repeat": args.repeat,
            "bytes": nbytes, "bitwise_equal": bitwise,
            **{f"{name}_gbps": round(v, 3) for name, v in gbps.items()},
            "cpu_vs_copy": round(gbps["cpu"] / gbps["copy"], 3),
            "reference_vs_copy": round(gbps["reference"] / gbps["copy"], 4),
            "cpu_vs_reference": round(gbps["cpu"] / gbps["reference"], 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    r = run(args)
    print(f"fp8 -> bf16 block dequant, {r['rows']} x {r['cols']}, block {r['block']}, {r['threads']} threads, "
          f"{r['bytes'] / 1e6:.0f} MB moved per pass, best of {r['repeat']}")
    for name, label in [("copy", "torch copy_ (same bytes)"), ("cpu", "kernels cpu path"),
                        ("reference", "reference x.float()*scale")]:
        print(f"  {label:<28}{r[f'{name}_gbps']:8.2f} GB/s  {r[f'{name}_gbps'] / r['copy_gbps']:6.3f}x copy_")
    print(f"  cpu path output equals the reference bit for bit: {'yes' if r['bitwise_equal'] else 'NO'}")
    print(json.dumps(r))
    return 0 if r["bitwise_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
