"""From data rows to token-id prompts, and from sampled responses to the padded training batch.

    train, test = load_rows(cfg.data, run_dir)                  # rl.data schema rows
    prompts = encode_prompts(rows, tokenizer, max_prompt_tokens)  # chat template -> token ids
    stream = PromptStream(len(prompts), seed); idx = stream.take(P)   # epoch-shuffled, resumable
    batch = build_batch(prompt_ids_P, samples_P)                 # tensors for rl.policy and rl.grpo

Batch layout (B rows, one per sample, prompt by prompt in the order given): row b is prompt +
response, right-padded with 0; `lengths_B` counts its real tokens; `group_B[b]` is the index p of
its prompt in this call (the GRPO group: rl.grpo takes groups from it, never from row order, so
rows may later be reordered, packed or filtered; the dataset index is not used because one step may
draw a prompt twice); `mask_BT[b, t]` is True where position t predicts a response token
(t = prompt_len - 1 ... length - 2); `rollout_logp_BT` holds the engine's log-prob of that token
at the same place. Prompts may have different numbers of samples.
Leaves out: rewards (rl.reward), log-probs (rl.policy). Without it the loop would mix string and
tensor bookkeeping. Shape legend: P prompts, B samples in all, S longest row, T = S - 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rl.data import read_jsonl, write_jsonl


def load_rows(data, run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) for a DataSection: the synthetic task is written under run_dir/data."""
    if data.task == "synthetic":
        from rl.data.synthetic import ArithConfig, make_splits

        out = Path(run_dir) / "data"
        if not (out / "test.jsonl").is_file():
            for split, rows in make_splits(ArithConfig(**data.synthetic)).items():
                write_jsonl(out / f"{split}.jsonl", rows)
        train_path, test_path = out / "train.jsonl", out / "test.jsonl"
    else:
        if not data.train_path or not data.test_path:
            raise ValueError("data.task=jsonl needs data.train_path and data.test_path "
                             "(rows written by python -m rl.data.math_lighteval)")
        train_path, test_path = Path(data.train_path), Path(data.test_path)
    for p in (train_path, test_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: data file missing; check data.train_path / data.test_path")
    return list(read_jsonl(train_path)), list(read_jsonl(test_path))


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    """prompt token ids after the chat template (generation prompt included)"""
    ground_truth: str
    """answer the reward compares against"""


def encode_prompts(rows: list[dict], tokenizer, max_tokens: int) -> tuple[list[Prompt], int]:
    """Prompts that fit in `max_tokens`, and how many rows were skipped for length."""
    out, skipped = [], 0
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        if len(ids) > max_tokens:
            skipped += 1
            continue
        out.append(Prompt(tuple(int(i) for i in ids), str(row["ground_truth"])))
    if not out:
        raise ValueError(f"no prompt fits in data.max_prompt_tokens={max_tokens}; raise it")
    return out, skipped


class PromptStream:
    """Indices into the prompt list, reshuffled each epoch with (seed, epoch); its state is the
    position (epoch, index), so a resumed run draws exactly the prompts it would have drawn."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
            order = self._order(self.epoch)
            grab = order[self.index: self.index + k - len(out)]
            out += grab
            self.index += len(grab)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def build_batch(prompt_ids: list[tuple[int, ...]], samples: list[list]) -> dict:
    """The padded batch of module docstring; `samples[p][g]` are rl.rollout Samples."""
    if len(prompt_ids) != len(samples):
        raise ValueError(f"build_batch: {len(prompt_ids)} prompts but {len(samples)} sample groups; "
                         "pass samples[p] for each prompt p")
    rows, plen, logps, groups = [], [], [], []
    for p, (ids, group) in enumerate(zip(prompt_ids, samples)):
        for s in group:
            rows.append(list(ids) + list(s.token_ids))
            plen.append(len(ids))
            logps.append(s.logprobs)
            groups.append(p)
    B, S = len(rows), max(len(r) for r in rows)
    tokens_BS = torch.zeros(B, S, dtype=torch.long)
    mask_BT = torch.zeros(B, S - 1, dtype=torch.bool)
    rollout_logp_BT = torch.zeros(B, S - 1)
    for b, (row, p, lp) in enumerate(zip(rows, plen, logps)):
        tokens_BS[b, : len(row)] = torch.tensor(row)
        mask_BT[b, p - 1: len(row) - 1] = True
        rollout_logp_BT[b, p - 1: len(row) - 1] = torch.tensor(lp, dtype=torch.float32)
    return {"tokens_BS": tokens_BS, "lengths_B": torch.tensor([len(r) for r in rows]),
            "group_B": torch.tensor(groups, dtype=torch.long), "mask_BT": mask_BT,
            "rollout_logp_BT": rollout_logp_BT}
