"""Expand rules into concrete tensor pairs and prove the plan complete.

``expand`` turns each rule's ``{L}``/``{E}`` patterns into concrete names for one model config.
``check_complete`` proves that every source tensor is consumed exactly once and every target
tensor produced exactly once, and raises ``PlanError`` naming the offenders otherwise. Nothing
here reads tensor data: the inputs are names (from an index or a meta-device model).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

from mapping.family import ModelConfig
from mapping.rules import Rule, fill


class PlanError(ValueError):
    """A mapping plan does not account for every tensor exactly once."""


@dataclass(frozen=True)
class Entry:
    """One MCore tensor (TP=EP=PP=1 name) and the HF tensors it is made of."""
    mcore: str
    hf: tuple[str, ...]
    rule: Rule
    layer: Optional[int] = None
    expert: Optional[int] = None


def expand(rules: Iterable[Rule], m: ModelConfig) -> list[Entry]:
    entries = []
    for rule in rules:
        layers = [None]
        if "L" in rule.placeholders:
            layers = list(rule.layers if rule.layers is not None else range(m.num_layers))
        experts = list(range(m.num_experts)) if "E" in rule.placeholders else [None]
        for L in layers:
            for E in experts:
                vals = {k: v for k, v in (("L", L), ("E", E)) if v is not None}
                entries.append(Entry(fill(rule.mcore, **vals), tuple(fill(h, **vals) for h in rule.hf),
                                     rule, L, E))
    return entries


def _names(names: list[str], limit: int = 6) -> str:
    head = ", ".join(names[:limit])
    return head + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def check_complete(entries: list[Entry], hf_names: Iterable[str],
                   mcore_names: Optional[Iterable[str]] = None, family: str = "") -> None:
    """Raise ``PlanError`` unless entries use each HF name once and produce each MCore name once."""
    problems = []
    uses = Counter(h for e in entries for h in e.hf)
    have = set(hf_names)
    if dup := sorted(h for h, n in uses.items() if n > 1):
        problems.append(f"{len(dup)} HF tensors mapped more than once: {_names(dup)}")
    if missing := sorted(set(uses) - have):
        problems.append(f"{len(missing)} HF tensors the {family} rules need are absent: {_names(missing)}")
    if unmapped := sorted(have - set(uses)):
        problems.append(f"{len(unmapped)} HF tensors no {family} rule maps: {_names(unmapped)}")
    produced = Counter(e.mcore for e in entries)
    if dup := sorted(k for k, n in produced.items() if n > 1):
        problems.append(f"{len(dup)} MCore tensors produced more than once: {_names(dup)}")
    if mcore_names is not None:
        want = set(mcore_names)
        if absent := sorted(want - set(produced)):
            problems.append(f"{len(absent)} MCore tensors no rule produces: {_names(absent)}")
        if extra := sorted(set(produced) - want):
            problems.append(f"{len(extra)} rule targets the MCore model does not have: {_names(extra)}")
    if problems:
        raise PlanError("; ".join(problems))
