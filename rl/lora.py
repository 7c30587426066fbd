"""LoRA adapters on a Megatron-Core policy at any TP/PP/EP/CP layout (Hu et al. 2021): y = W x +
(alpha / r) B A x, with W frozen and only A [r, in] and B [out, r] trained, so the distributed
optimizer holds adapters only and the live sync sends megabytes.

    adapters = attach(chunks, sites, cfg.model.lora, seed)      # before DDP: only adapters require grad
    tensors = peft_tensors(chunks)                              # global rank 0: PEFT names -> tensors

Where they sit: ``mapping.lora.lora_sites`` names the MCore linears and, per linear, its HF parts (q, k, v
for ``linear_qkv``; gate, up for ``linear_fc1``). Each targeted part gets its own A and B, exactly as PEFT
holds them, and a forward hook on the MCore linear adds the parts' outputs to its output, each part's rows
where the rule's own transform puts that part's weight rows (found once by running the transform on row
indices, so QKV's per-group interleave and SwiGLU's per-rank [gate_r; up_r] need no code of their own).

Tensor parallelism follows the base linear (read off its weight, as the live sync does):
  * column-parallel (q/k/v, gate/up, MLA projections in the local spec): A [r, in] whole on every TP rank,
    B split by output rows like W. The input is the one W sees (gathered from the sequence-parallel
    region, whose backward hands each rank its slice); A's output passes an identity whose backward sums
    the TP ranks' gradients (``copy_to_tensor_model_parallel_region``), so A's gradient and the input's are
    complete and equal on every rank;
  * row-parallel (o_proj, down_proj): A split by input columns like W, its partial products summed over
    TP (``reduce_from_tensor_model_parallel_region``), B whole and applied to the whole sequence; under
    sequence parallelism the output is then scattered over the sequence like W's (whose backward gathers
    the whole gradient back, so B's gradient is complete on every rank);
  * whole (TE keeps MLA's down projections duplicated): A and B whole; under SP they see this rank's slice
    of the sequence only, so they are tagged ``sequence_parallel`` and ``finalize_model_grads`` sums them;
  * routed experts (``experts``): one A, B per expert, expert-parallel like the expert (``allreduce=False``:
    DDP sums them over expert data parallel); expert tensor parallelism (etp > 1) is refused.
Initialisation: A from a generator seeded by (seed, global name) over the whole [r, in] matrix, then cut
to this rank's shard, B = 0: every layout starts from the same adapters (tests compare TP=2 with TP=1).
Checkpoints: ``chunk.lora`` is a module of the chunk with a ``sharded_state_dict`` (keys
``lora.<global MCore linear>.<HF part>.A|B``, sharded like the adapters), so rl.checkpoint saves and
reshards them with the model; the base checkpoint is loaded without them.
Leaves out: dropout with TP > 1 (ranks would drop different features: refused), DoRA, rsLoRA, LoRA on
embeddings. Shape legend: s sequence (local under SP), b batch, r rank, i/o in/out features (local).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from mapping import rules as R
from mapping.lora import Site, peft_key


def _seeded(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _mode(weight: torch.Tensor) -> str:
    if getattr(weight, "tensor_model_parallel", False):
        return {0: "column", 1: "row"}[weight.partition_dim]
    return "whole"


class SiteAdapters(torch.nn.Module):
    """The adapters of one MCore linear (one A, B per targeted HF part) and their forward."""

    def __init__(self, site: Site, base, global_module: str, rank: int, alpha: float, dropout: float,
                 shapes: R.Shapes, seed: int):
        super().__init__()
        self.site, self.global_module, self.scale = site, global_module, alpha / rank
        w = base.weight
        self.mode = "expert" if site.expert else _mode(w)
        self.group = getattr(base, "tp_group", None)
        self.tp = self.group.size() if self.group is not None and self.mode != "expert" else 1
        self.tp_rank = self.group.rank() if self.tp > 1 else 0
        self.sp = bool(getattr(base, "sequence_parallel", False)) and self.tp > 1
        if site.expert and self.group is not None and self.group.size() > 1:
            raise ValueError("model.lora.targets has experts with model.etp > 1: expert tensor parallelism is not "
                             "supported for expert adapters; set model.etp=1")
        if dropout > 0 and self.tp > 1:
            raise ValueError(f"model.lora.dropout={dropout} with model.tp={self.tp}: the TP ranks would drop different "
                             "features; set model.lora.dropout=0")
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        rows, cols = w.shape
        local = shapes
        if self.mode == "column" and site.entry.rule.op == "qkv":
            local = dataclasses.replace(shapes, num_query_groups=shapes.num_query_groups // self.tp)
        part_rows = R.OPS[site.entry.rule.op].to_hf(torch.arange(rows)[:, None], local)
        self.sizes = [len(p) for p in part_rows]
        self.register_buffer("inverse", torch.argsort(torch.cat([p.flatten() for p in part_rows])), persistent=False)
        in_full = cols * (self.tp if self.mode == "row" else 1)
        self.A, self.B = torch.nn.ParameterList(), torch.nn.ParameterList()
        self.names = []
        for part, hit, out in zip(site.parts, site.targeted, self.sizes):
            if not hit:
                continue
            short = part.rsplit(".", 1)[-1]
            a = torch.empty(rank, in_full)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=_seeded(seed, f"{global_module}.{short}"))
            if self.mode == "row":
                a = a.chunk(self.tp, dim=1)[self.tp_rank]
            self.A.append(torch.nn.Parameter(a.to(w.dtype).contiguous()))
            self.B.append(torch.nn.Parameter(torch.zeros(out, rank, dtype=w.dtype)))
            self.names.append(short)
        self._tag(site)

    def _tag(self, site: Site) -> None:
        for a, b in zip(self.A, self.B):
            if self.mode == "column":
                b.tensor_model_parallel, b.partition_dim, b.partition_stride = True, 0, 1
            elif self.mode == "row":  # B sees the whole sequence (y is scattered after it): complete gradient
                a.tensor_model_parallel, a.partition_dim, a.partition_stride = True, 1, 1
            elif self.mode == "whole":
                a.sequence_parallel = b.sequence_parallel = self.sp
            if site.expert:
                a.allreduce = b.allreduce = False

    def forward(self, x_sbi: torch.Tensor) -> torch.Tensor:
        """The adapters' contribution to the base linear's output, laid out like it."""
        from megatron.core import tensor_parallel as tpl

        x = x_sbi
        if self.mode == "column" and self.sp:
            x = tpl.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=self.group)
        x = self.dropout(x)
        outs, k = [], 0
        for hit, size in zip(self.site.targeted, self.sizes):
            if not hit:
                outs.append(x.new_zeros(*x.shape[:-1], size))
                continue
            h = F.linear(x, self.A[k])
            if self.tp > 1 and self.mode == "column":
                h = tpl.copy_to_tensor_model_parallel_region(h, group=self.group)
            elif self.tp > 1 and self.mode == "row":
                h = tpl.reduce_from_tensor_model_parallel_region(h, group=self.group)
            outs.append(F.linear(h, self.B[k]) * self.scale)
            k += 1
        y = torch.cat(outs, dim=-1)[..., self.inverse]
        if self.mode == "row" and self.sp:
            y = tpl.scatter_to_sequence_parallel_region(y, group=self.group)
        return y


def _hook(adapters: SiteAdapters):
    def hook(module, args, output):
        out, bias = output if isinstance(output, tuple) else (output, None)
        out = out + adapters(args[0]).to(out.dtype)
        return (out, bias) if isinstance(output, tuple) else out
    return hook


# ------------------------------------------------------------------------------ the chunk's adapters
class ChunkAdapters(torch.nn.Module):
    """All adapters of one model chunk (``chunk.lora``), keyed by local module path ("." -> "/")."""

    def __init__(self, sites: dict[str, SiteAdapters], expert_groups: tuple):
        super().__init__()
        self.sites = torch.nn.ModuleDict({k.replace(".", "/"): v for k, v in sites.items()})
        self._expert_groups = expert_groups  # (expert tp group, expert dp group), for checkpoint replicas

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """ShardedTensors keyed ``lora.<global MCore linear>.<HF part>.A|B``, split like the adapters."""
        from megatron.core import parallel_state as ps
        from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

        out = {}
        for local, ad in self.sites.items():
            dp = self._expert_groups[1] if ad.site.expert else ps.get_data_parallel_group(with_context_parallel=True)
            tp = self._expert_groups[0] if ad.site.expert else ad.group
            for i, name in enumerate(ad.names):
                for which, t in (("A", ad.A[i]), ("B", ad.B[i])):
                    key = f"{prefix}{ad.global_module}.{name}.{which}"
                    local_key = f"{prefix}sites.{local}.{which}.{i}"
                    axis = {"column": {"B": 0}, "row": {"A": 1}}.get(ad.mode, {}).get(which)
                    if axis is None:
                        out[local_key] = make_sharded_tensor_for_checkpoint(t, key, tp_group=tp, dp_cp_group=dp)
                    else:
                        out[local_key] = make_tp_sharded_tensor_for_checkpoint(t, key, axis, tp_group=tp,
                                                                               dp_cp_group=dp)
        return out


def _local_offsets(chunk, num_experts: int) -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    from rl.sync.layout import layer_offset

    ep = ps.get_expert_model_parallel_world_size() if num_experts else 1
    return layer_offset(chunk), (ps.get_expert_model_parallel_rank() * (num_experts // ep) if num_experts else 0)


def attach(chunks: list, sites: list[Site], lora, m, seed: int) -> list[ChunkAdapters]:
    """Freeze every chunk's own parameters and hang the targeted sites' adapters on them (before DDP
    wraps the chunks, so only adapters get gradient buffers and optimizer state)."""
    from megatron.core import parallel_state as ps

    from rl.sync.layout import global_name

    by_module = {s.module: s for s in sites}
    groups = (ps.get_expert_tensor_parallel_group(check_initialized=False),
              ps.get_expert_data_parallel_group(check_initialized=False))
    out = []
    for chunk in chunks:
        chunk.requires_grad_(False)
        layers, experts = _local_offsets(chunk, m.num_experts)
        found = {}
        for name, module in chunk.named_modules():
            site = by_module.get(global_name(name, layers, experts))
            if site is not None and hasattr(module, "weight"):
                found[name] = SiteAdapters(site, module, site.module, lora.rank, lora.alpha, lora.dropout, m.shapes,
                                           seed)
                module.register_forward_hook(_hook(found[name]))
        chunk.lora = ChunkAdapters(found, groups)
        out.append(chunk.lora)
    return out


# ------------------------------------------------------------------------------ PEFT tensors
def _whole(ad: SiteAdapters, t: torch.Tensor, which: str) -> torch.Tensor:
    """The whole A or B of a part from this rank's shard (collective over the linear's TP group)."""
    import torch.distributed as dist

    axis = {"column": {"B": 0}, "row": {"A": 1}}.get(ad.mode, {}).get(which)
    if axis is None or ad.tp == 1:
        return t.detach()
    parts = [torch.empty_like(t) for _ in range(ad.tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=ad.group)
    return torch.cat(parts, dim=axis)


def peft_tensors(chunks: list) -> Optional[dict[str, torch.Tensor]]:
    """Every adapter as PEFT names it (``base_model.model.<HF module>.lora_A.weight``), whole, at global
    rank 0 (None elsewhere). Collective over all trainer ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    mine = {}
    for chunk in chunks:
        for ad in sorted(chunk.lora.sites.values(), key=lambda a: a.global_module):
            parts = [p for p, hit in zip(ad.site.parts, ad.site.targeted) if hit]
            for i, part in enumerate(parts):
                a, b = _whole(ad, ad.A[i], "A"), _whole(ad, ad.B[i], "B")
                mine[peft_key(part, "A")], mine[peft_key(part, "B")] = a, b
    holder = (ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
              and ps.get_data_parallel_rank() == 0 and ps.get_expert_tensor_parallel_rank() == 0)
    if dist.get_world_size() == 1:
        return mine
    got = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object({k: v.cpu() for k, v in mine.items()} if holder else {}, got, dst=0)
    if got is None:
        return None
    out = {}
    for part in got:
        out.update(part)
    return out


def load_peft(chunks: list, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy a PEFT adapter's tensors into this rank's adapters (each cut to its shard); every adapter
    must be in `tensors` with its shape (one-line errors naming the tensor; `check_peft_keys` refuses
    tensors no adapter takes)."""
    with torch.no_grad():
        for chunk in chunks:
            for ad in chunk.lora.sites.values():
                parts = [p for p, hit in zip(ad.site.parts, ad.site.targeted) if hit]
                for i, part in enumerate(parts):
                    for which, t in (("A", ad.A[i]), ("B", ad.B[i])):
                        key = peft_key(part, which)
                        if key not in tensors:
                            raise ValueError(f"{where}: no tensor {key}; the adapter was trained for other targets "
                                             "(model.lora.targets) or another model")
                        src = tensors[key]
                        axis = {"column": {"B": 0}, "row": {"A": 1}}.get(ad.mode, {}).get(which)
                        if axis is not None and ad.tp > 1:
                            src = src.chunk(ad.tp, dim=axis)[ad.tp_rank]
                        if tuple(src.shape) != tuple(t.shape):
                            raise ValueError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, this model's "
                                             f"adapter needs {tuple(t.shape)} here (is model.lora.rank the adapter's r?)")
                        t.copy_(src.to(t.dtype))


def check_peft_keys(sites: list[Site], tensors: dict, where: str) -> None:
    """Every tensor of a PEFT adapter must belong to a targeted part (one line naming the first that does not)."""
    from mapping.lora import targeted_parts

    expected = {peft_key(p, w) for p in targeted_parts(sites) for w in ("A", "B")}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"{where}: {len(extra)} tensors belong to no targeted linear (e.g. {extra[0]}); set "
                         "model.lora.targets to the adapter's target_modules")


def read_peft(directory: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config.json) of a PEFT adapter directory; one-line errors for a missing file."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    d = Path(directory)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name}: missing; a PEFT adapter directory holds adapter_config.json and "
                                    "adapter_model.safetensors (PeftModel.save_pretrained writes both)")
    return load_file(str(d / "adapter_model.safetensors")), json.loads((d / "adapter_config.json").read_text())
