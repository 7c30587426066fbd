"""Where each training step's batch comes from: sampled when the step needs it (synchronous), or one
step ahead while the trainer trains the previous one (one-step off-policy, `rollout.async_generation`).

    rollouts = Rollouts(produce, ahead=cfg.rollout.async_generation)   # produce(step) -> Collected
    got, waited_s = rollouts.take(step)          # this step's batch (generated ahead, or now)
    rollouts.launch(step + 1)                    # async: the engine samples step + 1 in the background
    ... logprobs and training on `got` ...
    ahead = rollouts.settle()                    # wait for it before the engine's weights change
    got, metrics = drop_stale(got, trainer_version, cfg.rollout.max_staleness, row_multiple)

Timeline with async on (version v_k = the policy after k training steps; the sync stamps the engine):
    step k:  take batch k, launch batch k+1 ........ the engine (at v_{k-1}) samples batch k+1
             logprobs + train on batch k (v_{k-1} -> v_k)   } these two overlap: timing/overlap_s
             settle batch k+1; sync v_k into the engine (completeness-checked as always); eval; checkpoint
so a batch is sampled by the weights one version older than those it is trained from (staleness 1;
0 at the first step of a run or of a resumed run). The trainer recomputes old_logp with its current
weights, the proximal policy of the decoupled PPO objective (Hilton et al. 2022, "Batch size-invariance
for policy optimization"; AReaL trains this way); the engine's own log-probs are the behaviour policy's,
so loss.correction (truncated or masked IS) corrects staleness and engine mismatch together, and
mismatch/* measures both.
Staleness bound: each sample carries the engine's weight version when it was sampled; a group holding
a sample older than trainer_version - rollout.max_staleness is dropped before the batch is built
(data/stale_groups_dropped), never trained on. The one-step pipeline stays within 1, so the bound is
the guard against a version gone wrong (an engine restarted on old weights), not the mechanism.
Checkpoints: the batch sampled ahead is saved beside the trainer state (`AHEAD_FILE`, written by the
driver), because the weights that sampled it are not: a resumed run trains on that very batch and
continues bitwise as the uninterrupted run would have.
Leaves out: more than one step ahead, rollouts interrupted by a weight update (partial rollouts),
several engines. Without it the engine idles while the trainer trains, and the trainer while it samples.
Shape legend: B responses.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from rl.sampling import Collected, usable_groups

AHEAD_FILE = "rollout_ahead.pt"


@dataclass
class Produced:
    got: Collected
    start: float
    """time.perf_counter() when sampling began"""
    end: float
    """... and ended"""


class Rollouts:
    def __init__(self, produce: Callable[[int], Collected], *, ahead: bool):
        self.produce, self.ahead = produce, ahead
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rollout-ahead") if ahead else None
        self._next: Optional[tuple[int, Future | Produced]] = None

    def _run(self, step: int) -> Produced:
        t = time.perf_counter()
        got = self.produce(step)
        return Produced(got, t, time.perf_counter())

    def take(self, step: int) -> tuple[Collected, float]:
        """Step `step`'s batch and the seconds this call waited for it (sampling it now if not ahead)."""
        t = time.perf_counter()
        if self._next is None:
            produced = self._run(step)
        else:
            ahead_step, item = self._next
            if ahead_step != step:
                raise RuntimeError(f"the batch sampled ahead is for step {ahead_step}, but step {step} asked")
            self._next = None
            produced = item.result() if isinstance(item, Future) else item
        return produced.got, time.perf_counter() - t

    def launch(self, step: int) -> None:
        """With `ahead`: start sampling step `step`'s batch in the background; else nothing."""
        if self.ahead:
            if self._next is not None:
                raise RuntimeError(f"a batch for step {self._next[0]} is already pending")
            self._next = (step, self._pool.submit(self._run, step))

    def settle(self) -> Optional[Produced]:
        """Wait for the batch sampled ahead (an engine error is raised here, as is); None if none."""
        if self._next is None:
            return None
        step, item = self._next
        produced = item.result() if isinstance(item, Future) else item
        self._next = (step, produced)
        return produced

    def pending(self) -> Optional[tuple[int, Collected]]:
        """(step, batch) sampled ahead and settled, for the checkpoint."""
        if self._next is None or isinstance(self._next[1], Future):
            return None
        return self._next[0], self._next[1].got

    def restore(self, step: int, got: Collected) -> None:
        """Resume with the batch a checkpoint saved for `step`."""
        self._next = (step, Produced(got, 0.0, 0.0))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Seconds two (start, end) intervals share."""
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def drop_stale(got: Collected, trainer_version: int, max_staleness: Optional[int],
               row_multiple: int = 1) -> tuple[Collected, dict]:
    """`got` without the groups holding a sample more than `max_staleness` versions older than
    `trainer_version` (None: no bound), cut to a usable number of groups if any went; the staleness
    of the kept samples (train/staleness_mean, _max) and the groups dropped."""
    versions = [[s.policy_version for s in group] for group in got.samples]
    for group in versions:
        if any(v > trainer_version for v in group):
            raise RuntimeError(f"a sample claims policy version {max(group)}, newer than the trainer's "
                               f"{trainer_version}: the engine's weight version is wrong")
    fresh = [max_staleness is None or trainer_version - min(g) <= max_staleness for g in versions]
    keep = [i for i, ok in enumerate(fresh) if ok]
    dropped = len(fresh) - len(keep)
    if dropped:
        sizes = [len(got.samples[i]) for i in keep]
        keep = keep[:usable_groups(sizes, len(got.samples), row_multiple)]  # rows must still split
        got = _subset(got, keep)
    stale_B = torch.tensor([trainer_version - v for i in keep for v in versions[i]], dtype=torch.float32)
    metrics = {"data/stale_groups_dropped": dropped,
               "train/staleness_mean": stale_B.mean() if len(stale_B) else None,
               "train/staleness_max": stale_B.max() if len(stale_B) else None}
    return got, metrics


def _subset(got: Collected, keep: list[int]) -> Collected:
    offsets = [0]
    for group in got.samples:
        offsets.append(offsets[-1] + len(group))
    rows = [r for i in keep for r in range(offsets[i], offsets[i + 1])]
    idx = torch.tensor(rows, dtype=torch.long)
    return Collected(prompts=[got.prompts[i] for i in keep], samples=[got.samples[i] for i in keep],
                     rewards_B=got.rewards_B[idx], scores_B=got.scores_B[idx], rounds=got.rounds,
                     metrics=dict(got.metrics, **{"data/groups_short": got.metrics.get("data/groups_short", 0)
                                                  + len(got.samples) - len(keep)}))


def save_ahead(ckpt_dir: Path, step: int, got: Collected) -> None:
    """Write the batch sampled ahead for `step` into a checkpoint directory (driver side)."""
    torch.save({"step": step, "collected": got}, Path(ckpt_dir) / AHEAD_FILE)


def load_ahead(ckpt_dir: Path) -> Optional[tuple[int, Collected]]:
    path = Path(ckpt_dir) / AHEAD_FILE
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)  # our own file: dataclasses of samples and tensors
    return int(state["step"]), state["collected"]
