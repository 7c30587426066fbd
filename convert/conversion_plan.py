"""The conversion plan: family, model config, rule entries and the MCore storage layout,
built from config.json and tensor names/shapes alone (no tensor data, meta-device model).

Everything downstream (hf2mcore, mcore2hf, validate, the trainer's weight sync) starts here,
so the completeness and shape checks happen once, before any byte is written.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from runtime import megatron as rt
from convert.formats.te_layout import te_layout
from convert.formats.torch_dist import ObjectPiece, Piece
from convert.layout_model import model_layout
from mapping import rules as R
from mapping.family import ConfigError, Family, ModelConfig
from mapping.entries import Entry, PlanError, check_complete, expand
from mapping.registry import family_for
from mapping.rules import stacked_slice
from mapping.specs import target_name


@dataclass
class Plan:
    family: Family
    model: ModelConfig
    entries: list[Entry]
    pieces: dict[str, list[Piece]]
    objects: list[ObjectPiece]
    shapes: dict[str, tuple[int, ...]]   # MCore tensor name -> full shape (TP=1)
    dtypes: dict[str, torch.dtype]       # MCore tensor name -> stored dtype
    spec: str = "local"                  # MCore layer spec the layout is for: local | te

    def hf_outputs(self, entry: Entry) -> list[tuple[str, tuple, torch.dtype]]:
        """HF (name, shape, dtype) produced from one entry, computed on meta tensors."""
        meta = torch.empty(self.shapes[entry.mcore], dtype=self.dtypes[entry.mcore], device="meta")
        outs = R.to_hf(entry.rule, meta, self.model.shapes)
        dtype = entry.rule.hf_dtype or rt.DTYPES.get(self.model.hf_dtype, meta.dtype)
        return [(n, tuple(t.shape), dtype) for n, t in zip(entry.hf, outs)]

    def entry_bytes(self, entry: Entry) -> int:
        return sum(p.nbytes for p in self.pieces[entry.mcore])


MTP_MODES = ("auto", "require", "drop")


def read_model(hf_config: dict, source: str = "config.json") -> tuple[Family, ModelConfig]:
    """The family and its translated config; a missing field is one ``ConfigError`` line."""
    family = family_for(hf_config, source)
    try:
        return family, family.read_config(hf_config)
    except KeyError as err:
        raise ConfigError(f"{source}: field {err} is required for {family.name} and missing") from None


def without_mtp(m: ModelConfig) -> ModelConfig:
    """The same model without multi-token-prediction layers."""
    return dataclasses.replace(m, transformer={**m.transformer, "mtp_num_layers": None})


def mtp_hf_names(family: Family, m: ModelConfig, entries: Optional[list[Entry]] = None) -> list[str]:
    """HF tensors that only the declared MTP layers use (none when config.json declares none).
    ``entries``: ``expand(family.rules(m), m)`` when the caller has it (DeepSeek-V3: 0.15 s each)."""
    if not m.transformer.get("mtp_num_layers"):
        return []
    rules, without = family.rules(m), family.rules(without_mtp(m))
    kept = set(rules) & set(without)  # rules MTP does not change expand the same with or without it
    entries = expand(rules, m) if entries is None else entries
    used_without = {h for e in entries if e.rule in kept for h in e.hf}
    used_without.update(h for e in expand([r for r in without if r not in kept], m) for h in e.hf)
    return sorted({h for e in entries for h in e.hf} - used_without)


def resolve_mtp(mode: str, declared: list[str], present, source: str) -> str:
    """What to do with declared MTP layers, given which of their tensors ``present`` holds:
    ``"present"`` (convert them), ``"absent"`` (declared, none stored: convert without),
    ``"dropped"`` (``--mtp drop``) or ``"none"`` (none declared). Partly present is an error."""
    if mode not in MTP_MODES:
        raise ValueError(f"--mtp {mode!r}: expected one of {', '.join(MTP_MODES)}")
    if not declared:
        return "none"
    if mode == "drop":
        return "dropped"
    have = set(present) & set(declared)
    if len(have) == len(declared):
        return "present"
    missing = [n for n in declared if n not in have]
    if have:
        raise PlanError(f"{source}: MTP layer partly present: {missing[0]} is missing ({len(have)} of "
                        f"{len(declared)} MTP tensors stored); re-download the checkpoint, or pass --mtp drop")
    if mode == "require":
        raise PlanError(f"{source}: config.json declares MTP layers but the checkpoint stores none of their "
                        f"{len(declared)} tensors (first: {missing[0]}); --mtp require refuses, "
                        "--mtp auto converts without MTP")
    return "absent"


def build_plan(hf_config: dict, dtype: torch.dtype, spec: str = "local",
               source: str = "config.json", mtp: bool = True, expanded: Optional[list[Entry]] = None) -> Plan:
    """``mtp=False``: plan the model without its declared MTP layers. ``expanded``: the rules of
    that model already expanded (``expand(family.rules(m), m)``), when the caller has them."""
    family, m = read_model(hf_config, source)
    if not mtp:
        m = without_mtp(m)
    entries = expand(family.rules(m), m) if expanded is None else expanded
    if spec != "local":
        entries = [dataclasses.replace(e, mcore=target_name(e.mcore, m, spec)) for e in entries]
    # The local layout comes from a meta model with few experts (convert/layout_model.py). The TE
    # layout is derived from the local one on every machine (TE needs CUDA even on the meta
    # device), so CPU and GPU hosts write the same files; tests/test_te_layout.py compares it with
    # a real TE-spec model where TE is installed.
    pieces, objects, shapes = model_layout(m, dtype)
    if spec == "te":
        pieces, objects, shapes = te_layout(pieces, objects, shapes, m)
    check_complete(entries, [h for e in entries for h in e.hf], pieces.keys(), family.name)
    return Plan(family, m, entries, pieces, objects, {k: shapes[k] for k in pieces},
                {k: pieces[k][0].dtype for k in pieces}, spec)


MTP_PREFIX = "mtp."  # GPTModel's multi-token-prediction block


def plan_for_checkpoint(hf_config: dict, dtype: torch.dtype, keys, spec: str = "local",
                        source: str = "config.json") -> tuple[Plan, list[str]]:
    """The plan of an existing MCore checkpoint holding ``keys``: with the declared MTP layers
    only if it stores them (``hf2mcore --mtp auto`` leaves them out when the HF checkpoint has
    none; trainers may build without them). Returns the plan and the notes to print."""
    _, m = read_model(hf_config, source)
    declared = bool(m.transformer.get("mtp_num_layers"))
    stored = any(k.startswith(MTP_PREFIX) for k in keys)
    notes = [] if stored or not declared else [
        "config.json declares MTP layers, the MCore checkpoint has none (converted with mtp absent or "
        "dropped, or trained without): handled without MTP"]
    return build_plan(hf_config, dtype, spec, source=source, mtp=stored or not declared), notes


def check_hf_shapes(plan: Plan, hf_shapes: dict[str, tuple[int, ...]], source: str = "") -> None:
    """Every HF tensor must have the shape config.json implies: the inverse rule applied to the
    MCore shape (``Plan.hf_outputs``; split/reshape on meta tensors, no data)."""
    for e in plan.entries:
        for name, want, _ in plan.hf_outputs(e):
            got = tuple(hf_shapes[name])
            if got != want:
                raise PlanError(f"{source}{name} has shape {list(got)}, but config.json implies {list(want)} "
                                f"(for {e.mcore}); the checkpoint and its config.json disagree")


def hf_view(plan: Plan, names, info) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a checkpoint's tensors as the plan's entries name them: a tensor the rules
    read by expert slice (``x[E]``, ``mapping.rules.EXPERT_SLICE``) stands for all its slices.
    ``info(name)`` gives a tensor's (or slice's) ``TensorInfo``."""
    stacked = {s[0] for e in plan.entries for h in e.hf if (s := stacked_slice(h))}
    view = {}
    for n in names:
        shape = tuple(info(n).shape)
        if n in stacked:
            view.update({f"{n}[{i}]": shape[1:] for i in range(shape[0])})
        else:
            view[n] = shape
    return view


def check_hf_names(plan: Plan, hf_names, source: str = "") -> None:
    check_complete(plan.entries, hf_names, None, plan.family.name)


def output_dtype(requested: Optional[str], hf_dtype: str) -> torch.dtype:
    name = requested if requested and requested != "auto" else hf_dtype
    if name not in rt.DTYPES:
        raise ValueError(f"--dtype {name!r}: expected one of auto, {', '.join(sorted(rt.DTYPES))}")
    return rt.DTYPES[name]
