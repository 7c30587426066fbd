"""Shared by the tests that run the GRPO loop: the tiny config, a reward a random model earns, and
the converted tiny policy those runs start from."""
from pathlib import Path

from rl.config import load_config
from rl.reward import REWARDS

TINY = Path(__file__).resolve().parents[1] / "rl/configs/tiny.yaml"
PARITY = "test_length_parity"  # run.reward=PARITY


def length_parity(response: str, ground_truth: str) -> float:
    return float(len(response) % 2 == 0)  # a random model earns it half the time: advantages are not all 0


REWARDS[PARITY] = length_parity


def tiny_policy(root: Path) -> Path:
    """tiny.yaml's policy fabricated and converted under ``root`` (rl.prepare); its directory."""
    from rl.prepare import prepare_model

    prepare_model(load_config(TINY, [f"model.path={root / 'model'}"]))
    return root / "model"
