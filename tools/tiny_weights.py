"""The weights of a fabricated checkpoint: which tensors (``tensor_specs``), their values
(``draw_values``, ``materialise``) and how they are split into shard files (``plan_shards``,
``write_shards``). ``tools.make_tiny`` drives it; ``tools.fake_checkpoint`` uses the tensor list and
shard plan alone (no values) for weightless full-size checkpoints.

gpt-oss's experts are 3-D tensors (``experts.gate_up_proj [E, H, 2I]``, ``experts.down_proj [E, I, H]``,
as transformers holds them): drawn N(0, 1/in_features) per expert; with ``mxfp4`` they are stored as
the published ``<name>_blocks`` / ``<name>_scales`` pair (``tools.mxfp4_quant``), so a reader sees the
values transformers' own MXFP4 dequantisation makes of those bytes.

Shape legend: M, N = weight rows / columns; m, n = ceil(M / 128), ceil(N / 128); E experts.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from kernels.fp8_reference import fp8_block_quant_reference, scale_shape
from kernels.mxfp4_reference import MX_GROUP

# Linear layers DeepSeek (and Qwen3-FP8) publish in block fp8: attention and MLP/expert projections.
FP8_LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj",
                         "kv_a_proj_with_mqa", "kv_b_proj", "gate_proj", "up_proj", "down_proj"})
# What gpt-oss publishes in MXFP4: the stacked expert projections (everything else stays bf16).
MXFP4_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor before its values exist."""

    name: str
    """Published HF name, e.g. ``model.layers.1.mlp.experts.3.up_proj.weight``."""
    shape: tuple[int, ...]
    """Shape as stored."""
    dtype: torch.dtype
    """Stored dtype when not quantised."""
    seed_name: str
    """Name whose generator draws the values (the MTP layer's embedding/head reuse the main ones)."""
    fp8: bool = False
    """Stored as float8_e4m3fn plus ``<name>_scale_inv``."""
    mxfp4: bool = False
    """Stored as ``<name>_blocks`` plus ``<name>_scales`` (uint8; ``shape`` is the logical [*P, K, R])."""

    def stored(self) -> list[tuple[str, int]]:
        """(name, byte size) of every tensor this spec writes."""
        numel = math.prod(self.shape)
        if self.mxfp4:
            return [(self.name + "_blocks", numel // 2), (self.name + "_scales", numel // MX_GROUP)]
        if not self.fp8:
            return [(self.name, numel * self.dtype.itemsize)]
        m, n = scale_shape(self.shape)
        return [(self.name, numel), (self.name + "_scale_inv", m * n * 4)]

    def stored_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of every tensor this spec writes (the headers a reader sees)."""
        if self.mxfp4:
            *P, K, R = self.shape
            return {self.name + "_blocks": ((*P, R, K // MX_GROUP, MX_GROUP // 2), torch.uint8),
                    self.name + "_scales": ((*P, R, K // MX_GROUP), torch.uint8)}
        if self.fp8:
            return {self.name: (self.shape, torch.float8_e4m3fn),
                    self.name + "_scale_inv": (scale_shape(self.shape), torch.float32)}
        return {self.name: (self.shape, self.dtype)}


# ---------------------------------------------------------------- tensor list

def _published_names(model, state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """transformers' parameter names -> the names and shapes a published checkpoint stores, by
    transformers' own ``revert_weight_conversion`` (what ``save_pretrained`` writes: Qwen-MoE's
    fused ``experts.gate_up_proj`` back to ``experts.E.{gate,up}_proj``, Mixtral's to
    ``block_sparse_moe.experts.E.w1/w3``...), run on meta tensors."""
    from transformers.core_model_loading import revert_weight_conversion

    return [(name, tuple(t.shape)) for name, t in revert_weight_conversion(model, dict(state)).items()]


def _meta_model(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _mtp_tensors(published: list[tuple[str, tuple[int, ...]]], config) -> list[tuple[str, tuple[int, ...], str]]:
    """DeepSeek's published MTP layer at index num_hidden_layers, a decoder layer like the last
    (MoE) one plus its own norms and projection: (name, shape, seed_name)."""
    idx, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    last, p = f"model.layers.{idx - 1}.", f"model.layers.{idx}."
    rows = [(p + n[len(last):], s, p + n[len(last):]) for n, s in published if n.startswith(last)]
    rows += [(p + "embed_tokens.weight", (vocab, hidden), "model.embed_tokens.weight"),
             (p + "enorm.weight", (hidden,), p + "enorm.weight"),
             (p + "hnorm.weight", (hidden,), p + "hnorm.weight"),
             (p + "eh_proj.weight", (hidden, 2 * hidden), p + "eh_proj.weight"),
             (p + "shared_head.norm.weight", (hidden,), p + "shared_head.norm.weight"),
             (p + "shared_head.head.weight", (vocab, hidden), "lm_head.weight")]
    return rows


def _natural_key(name: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def tensor_specs(config, dtype: torch.dtype, fp8: bool, mxfp4: bool = False) -> list[TensorSpec]:
    """Every tensor of the checkpoint ``config`` describes, in published names and natural order;
    ``mxfp4``: gpt-oss's stacked expert projections as MXFP4 blocks and scales."""
    model = _meta_model(config)
    state = model.state_dict()
    if config.get_text_config().tie_word_embeddings:
        state.pop("lm_head.weight", None)
    rows = [(n, s, n) for n, s in _published_names(model, state)]
    if getattr(config, "num_nextn_predict_layers", 0):
        if any(n.startswith(f"model.layers.{config.num_hidden_layers}.") for n, _, _ in rows):
            raise RuntimeError("transformers now builds the MTP layer itself; tools/make_tiny.py "
                               "must stop adding it")
        rows += _mtp_tensors([(n, s) for n, s, _ in rows], config)
    specs = []
    for name, shape, seed_name in rows:
        quantise = fp8 and len(shape) == 2 and name.endswith(".weight") \
            and name.split(".")[-2] in FP8_LINEARS
        kept = torch.float32 if name.endswith("e_score_correction_bias") else dtype
        packed = mxfp4 and len(shape) == 3 and bool(MXFP4_EXPERTS.search(name))
        specs.append(TensorSpec(name, shape, kept, seed_name, quantise, packed))
    return sorted(specs, key=lambda s: _natural_key(s.name))


# ---------------------------------------------------------------- values

def _norm_gain(g: torch.Generator, shape) -> torch.Tensor:
    return 0.5 + torch.rand(shape, generator=g)


def _bias(g: torch.Generator, shape) -> torch.Tensor:
    return 0.1 * torch.randn(shape, generator=g)


def _router_bias(g: torch.Generator, shape) -> torch.Tensor:
    return 0.2 * torch.randn(shape, generator=g)


def _sinks(g: torch.Generator, shape) -> torch.Tensor:
    return torch.randn(shape, generator=g)  # gpt-oss attention sink logits: O(1), so they matter


def _expert_matrices(g: torch.Generator, shape) -> torch.Tensor:
    """Stacked experts [E, in, out] (transformers' gpt-oss layout): N(0, 1/in) each."""
    return torch.randn(shape, generator=g) / math.sqrt(shape[1])


def _matrix(g: torch.Generator, shape) -> torch.Tensor:
    if len(shape) != 2:
        raise ValueError(f"no sampler for a {len(shape)}-D weight of shape {shape}: add a rule to "
                         f"_SAMPLERS in tools/make_tiny.py")
    return torch.randn(shape, generator=g) / math.sqrt(shape[1])


# First matching regex (on the seed name) picks how a tensor's values are drawn.
_SAMPLERS: tuple[tuple[re.Pattern, Callable], ...] = (
    (re.compile(r"e_score_correction_bias$"), _router_bias),
    (re.compile(r"norm\.weight$"), _norm_gain),
    (re.compile(r"(\.|_proj_)bias$"), _bias),  # gpt-oss: experts.gate_up_proj_bias [E, 2I]
    (re.compile(r"\.self_attn\.sinks$"), _sinks),
    (MXFP4_EXPERTS, _expert_matrices),
    (re.compile(r"\.weight$"), _matrix),
)


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw_values(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The float32 values of ``spec`` for ``seed`` (before any cast or quantisation)."""
    for pattern, sampler in _SAMPLERS:
        if pattern.search(spec.seed_name):
            gen = torch.Generator().manual_seed(_tensor_seed(seed, spec.seed_name))
            return sampler(gen, spec.shape)
    raise ValueError(f"no sampler matches tensor {spec.name!r}: add a rule to _SAMPLERS")


def materialise(spec: TensorSpec, seed: int) -> dict[str, torch.Tensor]:
    """The stored tensor(s) of ``spec``: the weight, plus ``_scale_inv`` when fp8; ``_blocks`` and
    ``_scales`` when mxfp4."""
    values = draw_values(spec, seed)
    if spec.mxfp4:
        from tools.mxfp4_quant import mxfp4_quant

        blocks, scales = mxfp4_quant(values, layout="transformers")
        return {spec.name + "_blocks": blocks, spec.name + "_scales": scales}
    if not spec.fp8:
        return {spec.name: values.to(spec.dtype).contiguous()}
    w_fp8_MN, scale_inv_mn = fp8_block_quant_reference(values)
    return {spec.name: w_fp8_MN, spec.name + "_scale_inv": scale_inv_mn}


# ---------------------------------------------------------------- shards

def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[tuple[str, int, TensorSpec]]]:
    """Split the stored tensors, in order, into >= 2 files of similar byte size.

    With fp8 one boundary is moved between a weight and its ``_scale_inv`` (real checkpoints do
    that, and readers must cope).
    """
    entries = [(name, size, spec) for spec in specs for name, size in spec.stored()]
    total = sum(size for _, size, _ in entries)
    n_files = max(2, math.ceil(total / max_shard_bytes))
    if len(entries) < n_files:
        raise ValueError(f"{len(entries)} tensors cannot fill {n_files} files")
    cuts, running = [], 0
    for i, (_, size, _) in enumerate(entries):
        running += size
        if len(cuts) < n_files - 1 and running >= total * (len(cuts) + 1) / n_files \
                and i + 1 < len(entries) - (n_files - 2 - len(cuts)):
            cuts.append(i + 1)
    while len(cuts) < n_files - 1:  # a few huge tensors at the end: cut before them
        cuts.append(len(entries) - (n_files - 1 - len(cuts)))
    cuts = _straddle_one_scale(entries, sorted(set(cuts)))
    bounds = [0, *cuts, len(entries)]
    return [entries[a:b] for a, b in zip(bounds, bounds[1:])]


def _straddle_one_scale(entries, cuts: list[int]) -> list[int]:
    pairs = [i + 1 for i, (name, _, spec) in enumerate(entries) if spec.fp8 and name == spec.name]
    if not pairs or any(c in pairs for c in cuts):
        return cuts
    upper = cuts[1] if len(cuts) > 1 else len(entries)
    inside = [p for p in pairs if 0 < p < upper]
    if not inside:
        return cuts
    return [min(inside, key=lambda p: abs(p - cuts[0])), *cuts[1:]]


def write_shards(out: Path, plan, seed: int, progress: bool) -> tuple[dict[str, str], int]:
    """Draw and write each file in turn (memory ~ one file); return (weight_map, total bytes)."""
    from tqdm import tqdm
    weight_map, total, pending = {}, 0, {}
    bar = tqdm(total=sum(s for f in plan for _, s, _ in f), unit="B", unit_scale=True,
               desc="make_tiny", disable=not progress)
    for k, entries in enumerate(plan, start=1):
        fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name, size, spec in entries:
            if name not in pending:
                pending.update(materialise(spec, seed))
            tensors[name] = pending.pop(name)
            if tensors[name].nbytes != size:
                raise AssertionError(f"{name}: planned {size} bytes, drew {tensors[name].nbytes}")
            weight_map[name] = fname
            total += size
            bar.update(size)
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
    bar.close()
    if pending:
        raise AssertionError(f"tensors drawn but never written: {sorted(pending)}")
    return weight_map, total
