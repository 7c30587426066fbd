"""Rule types: how HF tensors combine into one Megatron-Core tensor, and how it is partitioned.

A ``Rule`` is data: an MCore parameter pattern, the HF pattern(s) it is made of, the name of a
pure transform (``OPS``) and the run-time partitioning (``tp``, ``expert``). Placeholders
``{L}`` (layer) and ``{E}`` (expert) must appear identically on both sides: this is checked
when a rule is built, so a typo fails at import time, not half-way through a 600 GB conversion.

Transforms are pure functions on *global* tensors (no process groups, no files):

* ``copy``     one HF tensor == the MCore tensor.
* ``qkv``      HF q, k, v (weights or biases) <-> MCore ``linear_qkv``, laid out per query group:
               the group's query heads, then its key head, then its value head.
* ``gate_up``  HF gate, up <-> MCore SwiGLU ``linear_fc1`` stored as ``[gate; up]``. At run time
               TP rank r holds ``[gate_r; up_r]``: ``merge_tp`` undoes that.
* ``vocab``    embedding / output rows padded with zeros to the padded vocab size.
* ``vocab_shared`` the same, from two HF copies that must be equal (DeepSeek's MTP layer keeps
               its own copy of the embedding and the output head; MCore shares one).

More transforms can be added by name with ``register_op`` (a family file registers the ones only
it needs, next to its rules).

Experts stacked in one HF tensor (gpt-oss's ``experts.gate_up_proj`` of shape [E, H, 2I]): an HF
pattern ending in ``[{E}]`` names expert E's slice along the tensor's first axis (the stacking
axis is data in the rule: ``EXPERT_SLICE``). The rule is still one MCore tensor per expert; readers
and writers turn ``name[E]`` into that slice (``stacked_slice``) and write a stacked tensor from
its slices in expert order.

What is left to the callers: reading, writing, gathering across ranks (``convert/``, ``rl/``).

Shape legend: H = hidden, G = query groups, Q = query heads per group, D = head dim,
V = vocab rows (true), Vp = padded vocab rows.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

PLACEHOLDER = re.compile(r"\{([A-Z])\}")
PARTITIONS = ("replicated", "column", "row")


@dataclass(frozen=True)
class Shapes:
    """What the transforms need to know about the model (filled by the family's config reader)."""
    num_query_groups: int = 1
    heads_per_group: int = 1
    head_dim: int = 1
    vocab_size: int = 0
    padded_vocab_size: int = 0


@dataclass(frozen=True)
class Op:
    """A pure transform. ``to_mcore(list_of_hf) -> mcore``; ``to_hf(mcore) -> list_of_hf``;
    ``merge_tp(list_of_rank_shards, dim) -> global`` (default: concatenate along ``dim``)."""
    to_mcore: Callable[[list, Shapes], torch.Tensor]
    to_hf: Callable[[torch.Tensor, Shapes], list]
    merge_tp: Optional[Callable[[list, int], torch.Tensor]] = None
    arity: Optional[int] = None  # number of HF tensors; None = exactly one


def _qkv_to_mcore(ts, s: Shapes):
    q, k, v = (t.reshape(s.num_query_groups, -1, *t.shape[1:]) for t in ts)
    return torch.cat([q, k, v], dim=1).reshape(-1, *ts[0].shape[1:])


def _qkv_to_hf(t, s: Shapes):
    G, D = s.num_query_groups, s.head_dim
    grouped = t.reshape(G, (s.heads_per_group + 2) * D, *t.shape[1:])
    q, k, v = grouped.split([s.heads_per_group * D, D, D], dim=1)
    return [x.reshape(-1, *t.shape[1:]).contiguous() for x in (q, k, v)]


def _gate_up_merge_tp(shards, dim):
    halves = [sh.chunk(2, dim=dim) for sh in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)


def _vocab_to_mcore(ts, s: Shapes):
    (t,) = ts
    if t.shape[0] != s.vocab_size:
        raise ValueError(f"vocab rows {t.shape[0]} != config vocab_size {s.vocab_size}")
    pad = s.padded_vocab_size - t.shape[0]
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


def _vocab_shared_to_mcore(ts, s: Shapes):
    """Several HF copies of one tensor (DeepSeek's MTP layer repeats the embedding and head)."""
    for t in ts[1:]:
        if t.shape != ts[0].shape or (not t.is_meta and not torch.equal(t, ts[0])):
            raise ValueError("HF copies of a shared tensor differ; Megatron-Core stores one copy")
    return _vocab_to_mcore(ts[:1], s)


OPS: dict[str, Op] = {
    "copy": Op(lambda ts, s: ts[0], lambda t, s: [t]),
    "qkv": Op(_qkv_to_mcore, _qkv_to_hf, arity=3),
    "gate_up": Op(lambda ts, s: torch.cat(ts, dim=0),
                  lambda t, s: [x.contiguous() for x in t.chunk(2, dim=0)],
                  merge_tp=_gate_up_merge_tp, arity=2),
    "vocab": Op(_vocab_to_mcore, lambda t, s: [t[: s.vocab_size].contiguous()]),
    "vocab_shared": Op(_vocab_shared_to_mcore, lambda t, s: [t[: s.vocab_size].contiguous()] * 2, arity=2),
}


def register_op(name: str, op: Op, *, replace: bool = False) -> None:
    """Make transform ``op`` available to rules as ``op=name`` (a family file calls this at import)."""
    if name in OPS and not replace:
        raise ValueError(f"transform {name!r} is already registered; pick another name")
    OPS[name] = op


EXPERT_SLICE = "[{E}]"  # HF pattern suffix: expert E's slice along dim 0 of a tensor stacking all experts
_SLICE = re.compile(r"^(.*)\[(\d+)\]$")


def stacked_slice(name: str) -> Optional[tuple[str, int]]:
    """``("x", 3)`` for the concrete slice name ``"x[3]"``; None for a plain tensor name."""
    m = _SLICE.match(name)
    return (m.group(1), int(m.group(2))) if m else None


@dataclass(frozen=True)
class Rule:
    """One MCore parameter pattern <- one or more HF patterns.

    ``tp``: "column" (split dim 0 across TP), "row" (dim 1) or "replicated".
    ``expert``: partitioned over the expert axis by EP (and by ETP within an expert).
    ``layers``: restrict ``{L}`` to these layer indices (e.g. DeepSeek's first-k-dense layers).
    ``hf_dtype``: dtype the HF tensor keeps regardless of the model dtype (router expert bias).
    """
    mcore: str
    hf: tuple[str, ...]
    op: str = "copy"
    tp: str = "replicated"
    expert: bool = False
    layers: Optional[tuple[int, ...]] = None
    hf_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))
        if self.op not in OPS:
            raise ValueError(f"rule {self.mcore}: unknown op {self.op!r}; known: {sorted(OPS)}")
        want = OPS[self.op].arity or 1
        if len(self.hf) != want:
            raise ValueError(f"rule {self.mcore}: op {self.op!r} takes {want} HF tensors, got {len(self.hf)}")
        if self.tp not in PARTITIONS:
            raise ValueError(f"rule {self.mcore}: tp must be one of {PARTITIONS}, got {self.tp!r}")
        names = set(PLACEHOLDER.findall(self.mcore))
        for h in self.hf:
            if "[" in h and not (h.endswith(EXPERT_SLICE) and h.count("[") == 1 and self.expert):
                raise ValueError(f"rule {self.mcore} <- {h}: only an expert rule's HF pattern may end in "
                                 f"{EXPERT_SLICE} (expert E's slice of a stacked tensor); no other brackets")
            if set(PLACEHOLDER.findall(h)) != names:
                raise ValueError(f"rule {self.mcore} <- {h}: placeholders differ "
                                 f"({sorted(names)} vs {sorted(set(PLACEHOLDER.findall(h)))})")

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(sorted(set(PLACEHOLDER.findall(self.mcore))))

    @property
    def partition_dim(self) -> Optional[int]:
        return {"column": 0, "row": 1}.get(self.tp)

    def renamed(self, **kw) -> "Rule":
        return dataclasses.replace(self, **kw)


def fill(pattern: str, **values: int) -> str:
    """``fill("a.{L}.b", L=3) == "a.3.b"``."""
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), pattern)


def to_mcore(rule: Rule, hf_tensors: list, shapes: Shapes) -> torch.Tensor:
    return OPS[rule.op].to_mcore(hf_tensors, shapes)


def to_hf(rule: Rule, mcore_tensor: torch.Tensor, shapes: Shapes) -> list:
    return OPS[rule.op].to_hf(mcore_tensor, shapes)


def merge_tp(rule: Rule, shards: list) -> torch.Tensor:
    """Global tensor from the TP ranks' run-time shards (in rank order)."""
    if rule.partition_dim is None:
        return shards[0]
    merge = OPS[rule.op].merge_tp
    return merge(shards, rule.partition_dim) if merge else torch.cat(shards, dim=rule.partition_dim)
