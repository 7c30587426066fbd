"""The main job on an embedded default: the whole pipeline on a fabricated DeepSeek-V3 model.

    fabricate (DeepSeek FP8 layout) -> fp8_cast_bf16 (2 MPI ranks) -> hf2mcore (2 MPI ranks)
    -> validate (tensors bitwise; fp32 logits at TP=1 and EP=2) -> GRPO steps (rl/train.py) on
    the converted checkpoint, vLLM rollouts + live weight sync -> mcore2hf export -> summary table

Each stage is the real command a user runs, launched as a subprocess; the summary shows its
status, time, output and key figure. Exit code 0 only if every stage passed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MPI2 = [str(Path(PY).parent / "mpiexec"), "-n", "2"]


def _validate_figure(work: Path) -> str:
    rep = json.loads((work / "validate.json").read_text())
    logits = [c["metrics"] for c in rep["checks"] if c["check"] == "logits"]
    worst = max(m["max_abs_diff"] for m in logits)
    return f"{len(rep['checks'])} checks, logits max|d| {worst:.2e}"


def _train_figure(work: Path) -> str:
    lines = (work / "rl" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    return (f"{last.get('step')} steps, reward {last.get('reward/mean', float('nan')):.2f}, "
            f"rollout/trainer logprob gap {last.get('mismatch/logprob_abs_diff_mean', float('nan')):.1e}, "
            f"sync {last.get('timing/sync_s', float('nan')):.2f}s")


def stages(work: Path, train: bool):
    fp8, bf16, mcore = work / "hf_fp8", work / "hf_bf16", work / "mcore"
    yield ("fabricate FP8", [PY, "-m", "tools.make_tiny", "--family", "deepseek_v3", "--fp8", "--dtype",
                             "bf16", "--out", str(fp8)], fp8, None)
    yield ("fp8_cast_bf16 x2", [*MPI2, PY, "-m", "tools.fp8_cast_bf16", "--in", str(fp8), "--out", str(bf16)],
           bf16, None)
    yield ("hf2mcore x2", [*MPI2, PY, "-m", "convert", "hf2mcore", "--hf-dir", str(bf16), "--out", str(mcore)],
           mcore, None)
    yield ("validate", [PY, "-m", "convert", "validate", "--hf-dir", str(bf16), "--mcore-dir", str(mcore),
                        "--layouts", "tp1,ep2", "--dtype", "fp32", "--json", str(work / "validate.json")],
           mcore, _validate_figure)
    if train:
        # The converted DeepSeek-V3 checkpoint itself: MCore policy (fp32 compute), vLLM rollouts
        # in bf16 (vLLM-CPU's MoE kernels need bf16), live sync after every step.
        yield ("GRPO (rl/train.py)", [PY, "rl/train.py", "--config", "rl/configs/tiny.yaml",
                                      f"model.path={mcore}", "model.fabricate=null", "rollout.dtype=bfloat16",
                                      "run.steps=3", f"run.dir={work / 'rl'}"], work / "rl", _train_figure)
    yield ("mcore2hf", [PY, "-m", "convert", "mcore2hf", "--mcore-dir", str(mcore), "--out", str(work / "hf_out")],
           work / "hf_out", None)


def run_stage(name, cmd, out, figure, work):
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    ok = r.returncode == 0
    if not ok:
        sys.stderr.write(f"--- {name} failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-4000:]}\n")
        key = f"exit {r.returncode}"
    else:
        key = figure(work) if figure else (r.stdout.strip().splitlines() or [""])[-1]
    print(f"[demo] {name}: {'ok' if ok else 'FAILED'} in {time.time() - t0:.1f}s", flush=True)
    return ok, (name, "ok" if ok else "FAILED", f"{time.time() - t0:.1f}s", str(out), key)


def print_table(rows) -> None:
    head = ("stage", "status", "time", "output", "key figure")
    width = [max(len(str(x[i])) for x in [head, *rows]) for i in range(4)]
    print()
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:4], width)) + "  " + str(r[4])[:100])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "work" / "demo"), help="scratch folder (recreated)")
    p.add_argument("--no-train", action="store_true", help="skip the GRPO stage")
    a = p.parse_args(argv)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0, rows, ok = time.time(), [], True
    for name, cmd, out, figure in stages(work, train=not a.no_train and (ROOT / "rl" / "train.py").is_file()):
        if not ok:
            rows.append((name, "skipped", "-", str(out), "an earlier stage failed"))
            continue
        ok, row = run_stage(name, cmd, out, figure, work)
        rows.append(row)
    print_table(rows)
    print(f"demo: {'all stages passed' if ok else 'FAILED'} in {time.time() - t0:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
