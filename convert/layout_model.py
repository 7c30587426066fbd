"""The ``torch_dist`` layout of a full-size model, asked of a meta model with few experts.

``GPTModel.sharded_state_dict()`` of a meta-device model is the truth about keys, global shapes
and chunks (``convert.formats.torch_dist.layout``), but asking a full-size MoE model is slow:
DeepSeek-V3-671B has 58 MoE layers x 256 experts = 15k expert MLP modules (measured: 4.6 s to
build, 2.3 s to shard, most of a 9 s plan). Experts are homogeneous, so ``model_layout`` builds
the model with a probe count of experts ``n`` (``probe_experts``) and derives the rest:

* expert lists: the ``ModuleList``s of length ``n`` (``n`` equals no size in the config, so the
  layer lists cannot be mistaken for them);
* the expert axis of each piece and object: the one global axis whose offset steps by one from
  expert 0 to expert 1 and whose size is ``n``; expert ``i`` of ``E`` is expert 0's entry with
  offset ``i`` and size ``E`` there. Every probe expert is checked against that rule;
* E-sized dimensions of the MoE layer's other tensors (the router's weight and expert bias): a
  dimension of size ``n`` becomes ``E``; such tensors must be stored whole (checked);
* order: each expert list's run (expert-major, as MCore emits it) is replaced in place, so the
  metadata and the objects are written in the order a full model gives.

Any departure from these rules raises ``TorchDistError`` naming the tensor, so a Megatron-Core
upgrade that changes the expert layout fails loudly; ``tests/test_layout_model.py`` compares the
derived layout with a full meta model for every family, layer pattern, MTP and ``--spec te``.
Left out: grouped-GEMM experts (one tensor for all experts, no expert list): the full model is
built then. Without this module planning DeepSeek-V3 costs ~7 s of model building per process.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from convert.formats.torch_dist import ObjectPiece, ObjectRecord, Piece, TorchDistError, layout_records, object_key
from mapping.family import ModelConfig

Layout = tuple[dict[str, list[Piece]], list[ObjectPiece], dict[str, tuple[int, ...]]]
UPDATE = "megatron-core's expert layout changed; update convert/layout_model.py"


def _config_ints(value, out: set) -> set:
    if isinstance(value, dict):
        for v in value.values():
            _config_ints(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _config_ints(v, out)
    elif isinstance(value, int) and not isinstance(value, bool):
        out.add(value)
    return out


def probe_experts(m: ModelConfig) -> Optional[int]:
    """The expert count to build instead of ``m.num_experts``: the smallest multiple of the router
    groups that is >= max(2, top-k) and equals no size of the config (nor twice one, as gated
    linears have), so an axis of that size can only be an expert axis. The router's settings
    (``moe_router_*``: top-k, groups) are counts no tensor has as a size. ``None``: build as is."""
    if not m.num_experts:
        return None
    t = m.transformer
    sizes = _config_ints({k: v for k, v in t.items() if k != "num_moe_experts" and not k.startswith("moe_router_")},
                         {m.num_layers, m.padded_vocab_size})
    forbidden = sizes | {2 * s for s in sizes}
    step = t.get("moe_router_num_groups") or 1
    n = step * -(-max(2, t.get("moe_router_topk") or 1) // step)
    while n in forbidden:
        n += step
    return n if n < m.num_experts else None


def with_experts(m: ModelConfig, n: int) -> ModelConfig:
    return dataclasses.replace(m, num_experts=n, transformer={**m.transformer, "num_moe_experts": n})


def model_layout(m: ModelConfig, dtype: torch.dtype, derive: bool = True) -> Layout:
    """``(pieces, objects, shapes)`` of the local spec at TP=EP=PP=1 for ``m``, as
    ``torch_dist.layout`` of a full meta model gives them; ``derive=False`` builds that model."""
    threads = torch.get_num_threads()
    # Building computes small rope caches (MLA's yarn: per layer); on a busy 2-core machine,
    # intra-op threads on tiny tensors stall (measured: 0.3 s one thread, 1-2 s two).
    torch.set_num_threads(1)
    try:
        return _model_layout(m, dtype, derive)
    finally:
        torch.set_num_threads(threads)


def _model_layout(m: ModelConfig, dtype: torch.dtype, derive: bool) -> Layout:
    from runtime import megatron as rt

    rt.init_local()
    n = probe_experts(m) if derive else None
    if n is None:
        pieces, objects, shapes = layout_records(rt.build_from(m, spec="local", dtype=dtype, meta=True))
        return pieces, [o.piece for o in objects], shapes
    model = rt.build_from(with_experts(m, n), spec="local", dtype=dtype, meta=True)
    lists = {name for name, mod in model.named_modules() if isinstance(mod, torch.nn.ModuleList) and len(mod) == n}
    if not lists:  # grouped-GEMM experts: nothing to replicate
        return _model_layout(m, dtype, derive=False)
    pieces, objects, shapes = layout_records(model)
    return _derive(pieces, objects, shapes, lists, n, m.num_experts)


def _derive(pieces, objects: list[ObjectRecord], shapes, lists: set[str], n: int, E: int) -> Layout:
    """The layout at ``E`` experts from the probe model's (``n`` experts in each of ``lists``)."""
    split = _splitter(lists)
    scopes = tuple(sorted({p.rsplit(".", 2)[0] + "." for p in lists}))  # the MoE layers owning the lists
    out_pieces, out_shapes = {}, {}
    for name, source, ps in _replicate(list(pieces.items()), split, n, E, _piece_maker):
        out_pieces[name], out_shapes[name] = ps, shapes[source]
    for name in pieces:
        if split(name) is None and name.startswith(scopes) and n in shapes[name]:
            out_pieces[name], out_shapes[name] = _scaled(name, pieces[name], shapes[name], n, E)
    for o in objects:
        if split(o.name) is None and o.name.startswith(scopes) and n in o.global_shape:
            raise TorchDistError(f"{o.name}: an object of the MoE layer with an axis of {n} (the probe expert "
                                 f"count) outside the expert list; {UPDATE}")
    records = _replicate([(o.name, o) for o in objects], split, n, E, _object_maker)  # experts: ObjectPieces
    return out_pieces, [o if isinstance(o, ObjectPiece) else o.piece for _, _, o in records], out_shapes


def _splitter(lists: set[str]) -> Callable[[str], Optional[tuple[str, int, str]]]:
    """``name -> (expert list, expert index, rest)`` for names inside an expert list, else None."""
    def split(name: str):
        parts = name.split(".")
        for j in range(1, len(parts) - 1):
            if parts[j].isdigit() and ".".join(parts[:j]) in lists:
                return ".".join(parts[:j]), int(parts[j]), ".".join(parts[j + 1:])
        return None
    return split


def _replicate(items: list, split, n: int, E: int, maker) -> list[tuple]:
    """``items`` (ordered ``(name, value)``) with each expert list's run of ``n`` experts replaced,
    in place, by ``E``; returns ``(name, source name, value)``. ``maker(list, rest, values, n)``
    checks one entry's values over the ``n`` probe experts (``{list}.{i}.{rest}``) and returns
    ``make(E)``: its ``E`` values."""
    runs: dict[str, list] = {}
    order: list = []
    last = None
    for name, value in items:
        hit = split(name)
        if hit and hit[0] not in runs:
            runs[hit[0]] = []
            order.append((hit[0], runs[hit[0]]))
        elif hit and last != hit[0]:
            raise TorchDistError(f"{name}: the entries of expert list {hit[0]} are not contiguous; {UPDATE}")
        if hit:
            runs[hit[0]].append(hit[1:] + (value,))
        else:
            order.append((name, value))
        last = hit[0] if hit else None
    out = []
    for name, value in order:
        if name not in runs:
            out.append((name, name, value))
            continue
        k = len(value) // n
        rests = [rest for _, rest, _ in value[:k]]
        if k * n != len(value) or [(i, r) for i, r, _ in value] != [(i, r) for i in range(n) for r in rests]:
            raise TorchDistError(f"{name}: expected {n} experts with the same entries, in expert order; {UPDATE}")
        columns = [maker(name, rest, [value[i * k + j][2] for i in range(n)], n)(E)
                   for j, rest in enumerate(rests)]
        for i in range(E):
            out.extend((f"{name}.{i}.{rest}", f"{name}.0.{rest}", col[i]) for rest, col in zip(rests, columns))
    return out


def _axis(name: str, shape, offset0, offset1, n: int) -> int:
    """The expert axis: the one axis where expert 1's offset is expert 0's plus one, of size ``n``."""
    diff = [a for a, (x, y) in enumerate(zip(offset0, offset1)) if x != y]
    if len(diff) != 1 or offset1[diff[0]] != offset0[diff[0]] + 1 or shape[diff[0]] != n:
        raise TorchDistError(f"{name}: no expert axis (offsets {list(offset0)} for expert 0, {list(offset1)} for "
                             f"expert 1, global shape {list(shape)}, {n} experts); {UPDATE}")
    return diff[0]


def _at(t: tuple, axis: int, value: int) -> tuple:
    return t[:axis] + (value,) + t[axis + 1:]


def _piece_maker(path: str, rest: str, values: list[list[Piece]], n: int):
    """Expert ``i``'s pieces: expert 0's with offset ``+i`` and size ``E`` on each piece's expert axis."""
    first, name0 = values[0], f"{path}.0.{rest}"
    if len(values[1]) != len(first):
        raise TorchDistError(f"{name0}: experts 0 and 1 have {len(first)} and {len(values[1])} pieces; {UPDATE}")
    axes = [_axis(name0, p.global_shape, p.offsets, q.offsets, n) for p, q in zip(first, values[1])]

    def make(E: int) -> list[list[Piece]]:
        names = [f"{path}.{i}.{rest}" for i in range(E)]
        columns = []
        for p, a in zip(first, axes):
            shape, lo, b, hi = _at(p.global_shape, a, E), p.offsets[:a], p.offsets[a], p.offsets[a + 1:]
            columns.append([Piece(p.key, shape, lo + (b + i,) + hi, p.sizes, p.dtype, names[i],
                                  p.view_shape, p.view_stride, p.view_offset) for i in range(E)])
        return [list(ps) for ps in zip(*columns)]

    if make(n) != values:
        raise TorchDistError(f"{path}: an expert's pieces differ from expert 0's other than along the expert "
                             f"axis ({rest}); {UPDATE}")
    return make


def _object_maker(path: str, rest: str, values: list[ObjectRecord], n: int):
    """Expert ``i``'s object: expert 0's with offset ``+i`` and size ``E`` on its expert axis."""
    o = values[0]
    a = _axis(f"{path}.0.{rest}", o.global_shape, o.global_offset, values[1].global_offset, n)
    payload, b = o.piece.payload, o.global_offset[a]

    def make(E: int) -> list[ObjectPiece]:
        shape = _at(o.global_shape, a, E)
        return [ObjectPiece(object_key(o.key, shape, _at(o.global_offset, a, b + i)), payload) for i in range(E)]

    if make(n) != [rec.piece for rec in values]:
        raise TorchDistError(f"{path}: an expert's object differs from expert 0's other than along the expert "
                             f"axis ({rest}); {UPDATE}")
    return make


def _contiguous(shape: tuple) -> tuple:
    return tuple(torch.empty(shape, device="meta").stride())


def _scaled(name: str, ps: list[Piece], shape: tuple, n: int, E: int):
    """Pieces and shape of a MoE-layer tensor with expert-count dimensions (the router's), at ``E``."""
    full = tuple(E if d == n else d for d in shape)
    out = []
    for p in ps:
        k = len(p.global_shape) - len(shape)
        if (p.global_shape[k:] != shape or p.sizes[k:] != shape or p.view_shape != shape or p.view_offset
                or p.view_stride != _contiguous(shape)):
            raise TorchDistError(f"{name}: a tensor with an expert-count dimension ({list(shape)}) stored in "
                                 f"parts; {UPDATE}")
        out.append(Piece(p.key, p.global_shape[:k] + full, p.offsets, p.sizes[:k] + full, p.dtype, p.param,
                         full, _contiguous(full), 0))
    return out, full
