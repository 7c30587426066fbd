"""Benchmark conversion against the disk and against the public converters' method, side by side.

Measured in one run, on the same checkpoint (``tools.make_tiny --size small``: a 1.5-2 GB bf16
model, built once and reused):

* ``cp -r`` + ``sync`` of the checkpoint folder (the disk's speed for the same bytes; ``sync``
  is given the copied files, as the converters fsync their own files: a bare ``sync`` would also
  wait for other processes' dirty pages on a shared machine);
* the start-up floor: ``python -c "import torch"`` (any torch-based converter pays it);
* ``hf2mcore`` and ``mcore2hf`` at 1 and 2 ranks (mpiexec): wall time and peak RSS per rank;
* the method public converters use: build the whole MCore model with real weights, copy every HF
  tensor in, ``dist_checkpointing.save`` (wall time, peak RSS).

Peak RSS is sampled (psutil, every 20 ms) per process of the launched tree. ``seconds`` is the
wall time of the whole command, ``work`` the tool's own timing from the start of the conversion
(after Python, torch and the command's imports). Each figure is the median of ``--repeat`` runs
(``cp`` and the floor: at least 3), taken in rounds (one run of each kind per round, a ``sync``
before each run). The last line is a JSON object with the ratios. A benchmark,
not a test: figures depend on the machine and its load.

    python -m tools.bench_convert [--size small] [--family qwen2] [--work DIR] [--repeat N]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def measure(cmd: list[str], **kw) -> dict:
    """Wall seconds and the largest per-process peak RSS (bytes) over the launched tree."""
    peaks: dict[int, int] = {}
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    root = psutil.Process(proc.pid)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                for p in [root, *root.children(recursive=True)]:
                    peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    python_peaks = sorted(peaks.values(), reverse=True)
    return {"seconds": time.time() - t0, "peak_rss": python_peaks[0] if python_peaks else 0,
            "stdout": out.strip().splitlines()[-1:] if out.strip() else []}


def median_of(runs: list[dict]) -> dict:
    """The run with the median wall time (its work time and RSS come with it); max RSS over all."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    mid = dict(ordered[(len(ordered) - 1) // 2])
    mid["peak_rss"] = max(r["peak_rss"] for r in runs)
    return mid


def work_seconds(run: dict) -> float:
    """The ``in X.Ys`` of a tool's summary line (time after imports), else the wall time."""
    m = re.search(r" in ([0-9.]+)s", " ".join(run["stdout"]))
    return float(m.group(1)) if m else run["seconds"]


def folder_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def largest_tensor(hf: Path) -> int:
    from convert.formats import HFCheckpoint

    return max(i.nbytes for i in HFCheckpoint(hf).tensors.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", help="make_tiny size (small = 1.5-2 GB)")
    p.add_argument("--family", default="qwen2", help="make_tiny family with that size")
    p.add_argument("--work", default=str(ROOT / "work" / "bench_convert"), help="scratch folder")
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement; the median is reported "
                   "(cp and the start-up floor: at least 3)")
    a = p.parse_args(argv)
    work = Path(a.work)
    hf = work / f"{a.family}-{a.size}"
    py = sys.executable
    mpi = [str(Path(py).parent / "mpiexec"), "-n", "2"]
    if not (hf / "config.json").is_file():
        shutil.rmtree(hf, ignore_errors=True)
        subprocess.run([py, "-m", "tools.make_tiny", "--family", a.family, "--size", a.size, "--dtype", "bf16",
                        "--out", str(hf)], cwd=ROOT, check=True)
    size = folder_bytes(hf)
    big = largest_tensor(hf)

    def fresh(name):
        shutil.rmtree(work / name, ignore_errors=True)
        return str(work / name)

    def cp_cmd():
        dst = fresh("cp")
        return ["sh", "-c", f"cp -r '{hf}' '{dst}' && sync '{dst}'/*"]

    runs = {
        "cp": cp_cmd,
        "torch_import": lambda: [py, "-c", "import torch"],
        "hf2mcore_1": lambda: [py, "-m", "convert", "hf2mcore", "--hf-dir", str(hf), "--out", fresh("m1")],
        "hf2mcore_2": lambda: [*mpi, py, "-m", "convert", "hf2mcore", "--hf-dir", str(hf), "--out", fresh("m2")],
        "mcore2hf_1": lambda: [py, "-m", "convert", "mcore2hf", "--mcore-dir", str(work / "m1"),
                               "--out", fresh("h1")],
        "mcore2hf_2": lambda: [*mpi, py, "-m", "convert", "mcore2hf", "--mcore-dir", str(work / "m1"),
                               "--out", fresh("h2")],
        "whole_model": lambda: [py, "-m", "tools.bench_convert_naive", "--hf-dir", str(hf),
                                "--out", fresh("naive")],
    }
    # Rounds, not blocks: every kind of run sees the machine in the same states (a shared
    # machine drifts over minutes), and each run starts with no dirty pages of the one before.
    rounds = max(a.repeat, 3)
    count = {name: rounds if name in ("cp", "torch_import") else a.repeat for name in runs}
    samples: dict[str, list] = {name: [] for name in runs}
    for i in range(rounds):
        for name, cmd in runs.items():
            if i < count[name]:
                subprocess.run(["sync"], check=True)
                samples[name].append(measure(cmd()))
    res = {name: median_of(s) for name, s in samples.items()}
    cp = res["cp"]["seconds"]
    print(f"checkpoint {hf.name}: {size / 1e9:.2f} GB, largest tensor {big / 1e6:.0f} MB")
    print("seconds = wall time of the command; work = the tool's own timing after imports and start-up; "
          "torch_import = python -c 'import torch', a floor for any torch-based converter")
    print(f"{'run':<14}{'seconds':>9}{'x cp':>7}{'work':>7}{'x cp':>7}{'peak RSS':>11}{'limit':>11}")
    limit = 2**30 + 3 * big
    for k, v in res.items():
        w = work_seconds(v)
        print(f"{k:<14}{v['seconds']:>9.1f}{v['seconds'] / cp:>7.2f}{w:>7.1f}{w / cp:>7.2f}"
              f"{v['peak_rss'] / 2**30:>10.2f}G"
              f"{'' if k in ('cp', 'whole_model', 'torch_import') else f'{limit / 2**30:>10.2f}G'}")
    ratios = {
        "bytes": size, "largest_tensor_bytes": big, "cp_seconds": cp,
        "torch_import_over_cp": res["torch_import"]["seconds"] / cp,
        "hf2mcore_over_cp": res["hf2mcore_1"]["seconds"] / cp,
        "hf2mcore_work_over_cp": work_seconds(res["hf2mcore_1"]) / cp,
        "mcore2hf_work_over_cp": work_seconds(res["mcore2hf_1"]) / cp,
        "hf2mcore_2ranks_over_cp": res["hf2mcore_2"]["seconds"] / cp,
        "hf2mcore_2ranks_work_over_cp": work_seconds(res["hf2mcore_2"]) / cp,
        "mcore2hf_over_cp": res["mcore2hf_1"]["seconds"] / cp,
        "mcore2hf_2ranks_over_cp": res["mcore2hf_2"]["seconds"] / cp,
        "mcore2hf_2ranks_work_over_cp": work_seconds(res["mcore2hf_2"]) / cp,
        "whole_model_over_hf2mcore_work": work_seconds(res["whole_model"]) / work_seconds(res["hf2mcore_1"]),
        "whole_model_over_hf2mcore_time": res["whole_model"]["seconds"] / res["hf2mcore_1"]["seconds"],
        "whole_model_over_hf2mcore_peak_rss": res["whole_model"]["peak_rss"] / res["hf2mcore_1"]["peak_rss"],
        "peak_rss_per_rank_max": max(v["peak_rss"] for k, v in res.items() if k.startswith(("hf2", "mcore2"))),
        "peak_rss_limit": limit,
    }
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
