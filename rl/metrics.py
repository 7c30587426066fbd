"""Metric sinks: one console line per step, RUN/metrics.jsonl, TensorBoard, optional wandb, and a
PNG of the learning curves at the end.

    log = MetricsLog(run_dir, cfg.logging, resume_step=None)
    log.write(step, {"reward/mean": 0.4, ...})     # every sink
    log.close()                                      # flush; curves.png

metrics.jsonl holds one JSON object per step with at least the keys in `REQUIRED` (a value that
was not measured this step is null, never a made-up number). On resume, lines after the resumed
step are dropped first, so the file always reads as one consistent run. TensorBoard events go to
RUN/tensorboard (tensorboard is a dependency). wandb is optional: `logging.wandb` = online or
offline (offline writes RUN/wandb and needs no network); when the package is missing that is an
error saying so, never a silent no-op.
Leaves out: computing the metrics (the loop does). Without it there is no record of a run.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

REQUIRED = ("step", "reward/mean", "accuracy/mean", "response_length/mean", "actor/pg_loss", "actor/kl",
            "actor/entropy", "actor/grad_norm", "actor/clip_frac", "mismatch/logprob_abs_diff_mean",
            "timing/rollout_s", "timing/train_s", "timing/sync_s", "timing/step_s")
CONSOLE = (("reward/mean", "reward {:.3f}"), ("accuracy/mean", "acc {:.3f}"), ("eval/accuracy", "eval {:.3f}"),
           ("response_length/mean", "len {:.1f}"), ("actor/pg_loss", "pg {:+.4f}"), ("actor/kl", "kl {:.2e}"),
           ("actor/entropy", "ent {:.2f}"), ("actor/grad_norm", "gn {:.2f}"),
           ("mismatch/logprob_abs_diff_mean", "mis {:.1e}"), ("mismatch/logprob_abs_diff_mean_no_replay", "mis w/o R3 {:.1e}"),
           ("routing/replay_agreement", "routing agree {:.1%}"), ("mismatch/masked_frac", "masked {:.1%}"),
           ("data/groups_filtered", "filtered {:.0f}"), ("train/pad_frac", "pad {:.1%}"),
           ("train/staleness_max", "stale {:.0f}"), ("timing/overlap_s", "overlap {:.1f}s"), ("timing/sync_s", "sync {:.2f}s"),
           ("timing/step_s", "step {:.1f}s"))


def _clean(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


class MetricsLog:
    def __init__(self, run_dir: Path, cfg, resume_step: int | None = None, total_steps: int | None = None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.total = total_steps
        self.cfg = cfg
        self._truncate(resume_step)
        self.tb = self._tensorboard() if cfg.tensorboard else None
        self.wandb = self._wandb() if cfg.wandb != "disabled" else None
        self.t0 = time.time()

    def _truncate(self, resume_step: int | None) -> None:
        if not self.path.is_file():
            return
        if resume_step is None:
            self.path.unlink()
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.dir / "tensorboard"))

    def _wandb(self):
        try:
            import wandb
        except ImportError as err:
            raise ImportError(f"logging.wandb={self.cfg.wandb!r} needs the wandb package, which is not "
                              "installed; install it or set logging.wandb=disabled") from err
        return wandb.init(project=self.cfg.wandb_project, mode=self.cfg.wandb, dir=str(self.dir),
                          name=self.dir.name)

    def write(self, step: int, metrics: dict) -> dict:
        row = {"step": step, **{k: None for k in REQUIRED if k != "step"}}
        row.update({k: _clean(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if v is not None}, step=step)
        print(self.console_line(step, row), flush=True)
        return row

    def console_line(self, step: int, row: dict) -> str:
        parts = [f"step {step}" + (f"/{self.total}" if self.total else "")]
        parts += [fmt.format(row[k]) for k, fmt in CONSOLE if row.get(k) is not None]
        return " | ".join(parts)

    def close(self) -> Path | None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        return plot(self.path, self.dir / "curves.png") if self.cfg.plot else None


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot(metrics_path: Path, out: Path) -> Path | None:
    """Reward, accuracy (train and held-out) and response length against step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read(metrics_path) if Path(metrics_path).is_file() else []
    if not rows:
        return None
    panels = (("reward", ["reward/mean"]), ("accuracy", ["accuracy/mean", "eval/accuracy"]),
              ("response length", ["response_length/mean"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o" if k.startswith("eval") else None, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
