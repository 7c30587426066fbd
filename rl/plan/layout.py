"""The trainer's parallel layout, checked against the model: which decoder layers each pipeline rank
builds, and the data-parallel degrees the distributed optimizer shards over.

Layer placement follows Megatron-Core 0.16.1's own rule (``transformer_block.get_num_layers_to_build``
and ``transformer_layer.get_transformer_layer_offset``), restated here from the config alone:

* even split: ``num_layers / pp`` layers per stage (``num_layers`` must divide);
* uneven first/last (``model.pp_first_layers`` / ``pp_last_layers`` = MCore's
  ``num_layers_in_first/last_pipeline_stage``): those stages take the given counts, the stages in
  between share the rest evenly (it must divide);
* virtual stages (``model.vpp``): each pipeline rank's layers are cut into ``vpp`` chunks, and chunk
  ``c`` of rank ``r`` starts at ``c * num_layers / vpp`` plus the chunk sizes of the ranks before ``r``:
  the model is traversed ``vpp`` times, each round through every rank.
``tests/test_rl_plan.py`` holds this against MCore's functions and meta models. Where MCore would
silently drop layers (floor divisions) this module refuses with one line instead.
Leaves out: ``pipeline_model_parallel_layout`` strings and ``account_for_embedding/loss_in_pipeline_split``
(no config field sets them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class PlanError(ValueError):
    """The config cannot describe a run: one line naming the setting and the fix."""


@dataclass(frozen=True)
class Layout:
    """Where each part of the policy lives on the trainer's ranks."""
    tp: int
    """tensor parallel size (attention, dense MLP, shared experts, vocabulary)"""
    pp: int
    """pipeline stages"""
    vpp: Optional[int]
    """virtual stages per pipeline rank (None: one chunk)"""
    ep: int
    """expert parallel size (routed experts)"""
    etp: int
    """expert tensor parallel size"""
    cp: int
    """context parallel size (the sequence is split over cp ranks)"""
    dp: int
    """data parallel size"""
    stage_layers: tuple[tuple[int, ...], ...]
    """the global decoder layer indices (0-based) each pipeline rank builds, in build order"""

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def dense_dp(self) -> int:
        """ranks sharing one copy of a dense parameter: the distributed optimizer shards over them
        (Megatron-Core's data-parallel group with context parallelism)"""
        return self.dp * self.cp

    @property
    def expert_dp(self) -> int:
        """ranks sharing one copy of a routed expert (Megatron-Core's expert data-parallel group)"""
        return self.world // (self.ep * self.etp * self.pp)


def stage_counts(n_layers: int, pp: int, first: Optional[int], last: Optional[int]) -> list[int]:
    """Decoder layers per pipeline rank (MCore's split), or PlanError naming the setting."""
    if pp == 1:
        return [n_layers]
    if first is None and last is None:
        if n_layers % pp:
            raise PlanError(f"model.pp={pp} does not divide the model's {n_layers} decoder layers; choose a pp that "
                            f"does, or set model.pp_first_layers / pp_last_layers for uneven stages")
        return [n_layers // pp] * pp
    middle_stages = pp - (first is not None) - (last is not None)
    middle = n_layers - (first or 0) - (last or 0)
    if middle < 0 or (middle_stages == 0 and middle) or (middle_stages and middle % middle_stages):
        raise PlanError(f"model.pp_first_layers={first}, pp_last_layers={last}: the other {middle} of {n_layers} "
                        f"layers do not split evenly over the {middle_stages} middle stages of pp={pp}; change them "
                        "so that they do")
    per = middle // middle_stages if middle_stages else 0
    counts = [per] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def stage_layers(n_layers: int, pp: int, first: Optional[int] = None, last: Optional[int] = None,
                 vpp: Optional[int] = None) -> tuple[tuple[int, ...], ...]:
    """The global layer indices of each pipeline rank, MCore's placement (see the module docstring)."""
    counts = stage_counts(n_layers, pp, first, last)
    chunks = vpp if vpp and pp > 1 else 1
    if any(c % chunks for c in counts):
        raise PlanError(f"model.vpp={vpp}: every stage's layer count ({counts}) must divide into {vpp} virtual "
                        "stages; change model.vpp or the stage sizes")
    size = [c // chunks for c in counts]
    per_round = sum(size)
    out = []
    for r in range(pp):
        start = sum(size[:r])
        out.append(tuple(c * per_round + start + i for c in range(chunks) for i in range(size[r])))
    return tuple(out)


def check_model(m, tp: int, ep: int, etp: int) -> None:
    """PlanError unless Megatron-Core can shard ``m`` (a mapping.family.ModelConfig) at this layout."""
    t = m.transformer
    heads = t["num_attention_heads"]
    groups = t.get("num_query_groups") or heads
    if heads % tp or (not m.mla and groups % tp):
        what = f"{heads} attention heads" + ("" if m.mla else f" and {groups} key/value groups")
        raise PlanError(f"model.tp={tp} does not divide the model's {what}; choose a tp that divides both")
    if m.padded_vocab_size % tp:
        raise PlanError(f"model.tp={tp} does not divide the padded vocabulary ({m.padded_vocab_size} rows); "
                        "choose a power of two up to 128")
    if m.num_experts and m.num_experts % ep:
        raise PlanError(f"model.ep={ep} does not divide the model's {m.num_experts} routed experts; choose an ep "
                        "that does")
    if not m.num_experts and ep > 1:
        raise PlanError(f"model.ep={ep} on a dense {m.family} model (no experts); set model.ep=1")
    if m.num_experts and (t.get("moe_ffn_hidden_size") or t["ffn_hidden_size"]) % etp:
        raise PlanError(f"model.etp={etp} does not divide the experts' hidden size; choose one that does")


def layout(s, m) -> Layout:
    """The checked layout of a TrainConfig's `model` section `s` (rl.config.ModelSection) for ModelConfig `m`:
    PlanError (a ValueError, one line) where Megatron-Core cannot build it; rl.stack checks the trainer with it."""
    etp = s.etp or s.tp
    check_model(m, s.tp, s.ep, etp)
    if s.tp * s.cp * s.dp % (s.ep * etp):
        raise PlanError(f"model.ep * etp = {s.ep * etp} must divide tp * cp * dp = {s.tp * s.cp * s.dp} (the ranks "
                        "of one pipeline stage); lower model.ep or raise model.dp")
    placed = stage_layers(m.num_layers, s.pp, s.pp_first_layers, s.pp_last_layers, s.vpp)
    return Layout(tp=s.tp, pp=s.pp, vpp=s.vpp if s.pp > 1 else None, ep=s.ep, etp=etp, cp=s.cp, dp=s.dp,
                  stage_layers=placed)
