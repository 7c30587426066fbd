"""The end-to-end demo on an embedded default: fabricate a tiny model, convert it HF -> MCore on
two MPI ranks, load it back and compare, export MCore -> HF, and print a summary table.

Stages are added here as the project grows (FP8 cast, validate, GRPO with live vLLM sync).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage(rows, name, cmd, out):
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    ok = r.returncode == 0
    last = (r.stdout.strip().splitlines() or [""])[-1]
    rows.append((name, "ok" if ok else "FAILED", f"{time.time() - t0:.1f}s", out, last[:90]))
    if not ok:
        sys.stderr.write(r.stdout[-2000:] + r.stderr[-4000:])
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__)
    p.add_argument("--work", default=str(ROOT / "work" / "demo"), help="scratch folder (recreated)")
    p.add_argument("--family", default="deepseek_v3", help="tiny model family to run")
    a = p.parse_args(argv)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py, mpi = sys.executable, [str(Path(sys.executable).parent / "mpiexec"), "-n", "2"]
    rows = []
    steps = [
        ("fabricate", [py, "-m", "tools.make_tiny", "--family", a.family, "--out", str(work / "hf"),
                       "--dtype", "bf16"], work / "hf"),
        ("hf2mcore x2", [*mpi, py, "-m", "convert", "hf2mcore", "--hf-dir", str(work / "hf"),
                         "--out", str(work / "mcore")], work / "mcore"),
        ("mcore2hf", [py, "-m", "convert", "mcore2hf", "--mcore-dir", str(work / "mcore"),
                      "--out", str(work / "hf_out")], work / "hf_out"),
    ]
    ok = all(stage(rows, name, cmd, out) for name, cmd, out in steps)
    head = ("stage", "status", "time", "output")
    width = [max(len(str(x[i])) for x in [head, *rows]) for i in range(4)]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(head, width)))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, width)), "|", r[4])
    print("demo:", "all stages passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
