"""The ``torch_dist`` layout of a Transformer Engine spec model, derived from the local spec's.

Transformer Engine needs CUDA, so on a CPU machine the TE-spec ``GPTModel`` cannot be built, not
even on the meta device. Its checkpoint layout differs from the local spec's (which we *can* ask
a meta model for) in two ways only, both read off megatron-core 0.16.1 and TE 2.8:

* names: norms that TE fuses into the following linear become that linear's
  ``layer_norm_weight`` (``mapping.specs.te_name``), and storage keys follow parameter names
  (no ``sharded_state_dict_keys_map``). The local GQA spec maps ``pre_mlp_layernorm`` to
  ``mlp.linear_fc1.layer_norm_weight`` even in MoE layers, where TE keeps a separate
  ``pre_mlp_layernorm``: MoE checkpoints of the two specs differ in that key.
* ``_extra_state``: every TE module (linears and norms alike) stores one ``ShardedObject``
  ``<module key>._extra_state`` whose global shape/offset are the module's prepended (layer,
  expert) axes, or ``(1,)``/``(0,)`` when there are none (``make_sharded_object_for_checkpoint``).
  The local spec's linears already store one each; TE's norms (``TENorm``) add theirs. Modules
  that stay Megatron-Core's own in the TE spec store none: the embedding, the output layer
  (``GPTModel`` drops its entry) and the MoE router. Attention's ``core_attention`` stores nothing
  in either spec.

Every object holds an empty ``uint8`` tensor, which is what TE writes for a module without FP8
state and what its ``set_extra_state`` skips on load (TE's norms accept it as well).

Leaves out: TE-only options that change the module tree (``use_te_op_fuser``,
``moe_use_legacy_grouped_gemm``); TEGroupedMLP needs nothing extra (its keys equal
SequentialMLP's by design). Without this file ``--spec te`` needs a CUDA machine with TE.
"""
from __future__ import annotations

import dataclasses
import io
import re

import torch

from convert.formats.torch_dist import ObjectPiece, Piece, TorchDistError
from mapping.family import ModelConfig
from mapping.specs import te_name

# Present in every TE-spec checkpoint (the final norm is a TENorm), absent from local-spec ones.
TE_MARKER = "decoder.final_layernorm._extra_state/shard_0_1"
# Modules that are Megatron-Core's own in the TE spec, so they store no ``_extra_state``.
NOT_TE = re.compile(r"^(embedding\.word_embeddings|output_layer|.*\.mlp\.router)$")


def _empty_state() -> bytes:
    buf = io.BytesIO()
    torch.save([torch.empty(0, dtype=torch.uint8)], buf)  # MCore stores a list per record
    return buf.getvalue()


def _prefix_map(pieces: dict[str, list[Piece]]) -> dict[str, str]:
    """Parameter-name prefix -> storage-key prefix, learned from local parameters whose storage
    key ends like their name (``decoder.layers.3.`` -> ``decoder.layers.``, expert
    ``...local_experts.5.`` -> ``...experts.experts.``); renamed keys teach nothing."""
    out: dict[str, str] = {}
    for name, ps in pieces.items():
        a, b = name.split("."), ps[0].key.split(".")
        n = 0
        while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
            n += 1
        if n == 0:
            continue
        p, k = ".".join(a[:-n]), ".".join(b[:-n])
        if out.setdefault(p, k) != k:
            raise TorchDistError(f"{name}: prefix {p} stored as both {out[p]} and {k}; megatron-core's "
                                 "local layout changed, update convert/te_layout.py")
    return out


def _storage_key(te: str, prefixes: dict[str, str]) -> str:
    """The TE spec's storage key of parameter ``te`` (no keys map in the TE spec)."""
    parts = te.split(".")
    for i in range(len(parts) - 1, -1, -1):
        head = ".".join(parts[:i])
        if head in prefixes:
            return ".".join(x for x in (prefixes[head], *parts[i:]) if x)
    raise TorchDistError(f"{te}: no storage prefix known for it; update convert/te_layout.py")


def _object_key(piece: Piece, ndim: int) -> str:
    """``<module key>._extra_state/shard_<offset>_<shape>`` for the module owning ``piece``."""
    prepend = len(piece.global_shape) - ndim
    shape = piece.global_shape[:prepend] or (1,)
    offset = piece.offsets[:prepend] or (0,)
    module_key = piece.key.rsplit(".", 1)[0]
    return (f"{module_key}._extra_state/shard_{'.'.join(map(str, offset))}_"
            f"{'.'.join(map(str, shape))}")


def te_layout(pieces: dict[str, list[Piece]], objects: list[ObjectPiece],
              shapes: dict[str, tuple[int, ...]], m: ModelConfig):
    """``(pieces, objects, shapes)`` of the TE spec from those of the local spec (see above);
    ``shapes``: each model tensor's shape."""
    prefixes = _prefix_map(pieces)
    te_pieces: dict[str, list[Piece]] = {}
    for local, ps in pieces.items():
        te = te_name(local, m)
        key = _storage_key(te, prefixes)
        te_pieces[te] = [p if (p.key, p.param) == (key, te) else dataclasses.replace(p, key=key, param=te)
                         for p in ps]
    te_shapes = {te_name(k, m): s for k, s in shapes.items()}
    keys: set[str] = set()
    for name, ps in te_pieces.items():
        module = name.rsplit(".", 1)[0]
        if not NOT_TE.match(module):
            keys.update(_object_key(p, len(te_shapes[name])) for p in ps)
    lost = sorted({o.unique_key for o in objects} - keys)
    if lost:
        raise TorchDistError(f"local-spec objects with no TE module: {', '.join(lost[:5])}; "
                             "megatron-core's spec changed, update convert/te_layout.py")
    payload = _empty_state()
    return te_pieces, [ObjectPiece(k, payload) for k in sorted(keys)], te_shapes
