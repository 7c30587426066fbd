"""Rule-based rewards for GRPO on math problems.

Public API (everything the trainer needs):
  - `compute_score(response, ground_truth, *, symbolic=False) -> float` (1.0 / 0.0);
  - `compute_scores(responses, ground_truths, name="math") -> (scores, n_errors)`;
  - `REWARDS` (name -> fn(response, ground_truth) -> float) and `get_reward(name)`;
  - `last_boxed(text)`, `normalize_answer(s)`, `is_equiv(a, b)` (shared with rl.data);
  - `default_checker()` -> the symbolic checker; call `.warmup()` once at start-up when the
    "math_verify" reward is used, so the first scores do not depend on worker start-up time.
Modules: extract (last box), normalize (Hendrycks rules), symbolic (math-verify worker with
a hard time limit), scoring (registry and batch API).
"""

from rl.reward.extract import last_boxed
from rl.reward.normalize import is_equiv, normalize_answer
from rl.reward.scoring import REWARDS, compute_score, compute_scores, get_reward
from rl.reward.symbolic import SymbolicChecker, default_checker

__all__ = [
    "REWARDS",
    "SymbolicChecker",
    "compute_score",
    "compute_scores",
    "default_checker",
    "get_reward",
    "is_equiv",
    "last_boxed",
    "normalize_answer",
]
