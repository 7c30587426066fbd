"""What the plan assumes beyond the trainer config: the cluster, and the speeds a step-time estimate
needs. Every field is a ``python -m rl.plan`` flag (``--gpu-gb``, ``--train-mfu``, ...) whose help is
the field's docstring, and every value is printed with the plan, so a reader sees what it rests on.
Leaves out: per-GPU-model presets (give the peak figures of your GPU instead).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Cluster:
    """The machines and how the run uses them."""
    gpus: Optional[int] = field(default=None, metadata={"metavar": "N"})
    """GPUs of the run. Colocated: the trainer's world (model.dp becomes gpus / (tp*pp*cp)); disaggregated:
    the trainer's tp*pp*cp*dp ranks plus rollout engines on the rest. Default: the config's trainer world
    (plus one engine when disaggregated)"""
    gpu_gb: float = 80.0
    """memory of one GPU in GB (1e9 bytes; an H100 SXM has 80, an H20 96)"""
    host_gb: float = 2048.0
    """host memory of one node in GB"""
    gpus_per_node: int = field(default=8, metadata={"metavar": "N"})
    """GPUs per node (host memory is summed over a node's ranks)"""
    reserve_gb: float = 4.0
    """GPU memory per trainer rank no formula here counts: CUDA context, NCCL buffers, allocator fragmentation"""
    engine_reserve_gb: float = 2.0
    """per engine GPU, what vLLM subtracts inside gpu_memory_utilization before sizing its KV cache besides the
    weights: its profiled activation peak, CUDA context, NCCL"""
    host_process_gb: float = 4.0
    """host memory of every trainer or engine process besides the tensors counted (CUDA, libraries, Ray)"""
    rollout_tp: Optional[int] = None
    """vLLM tensor parallel size of one engine; default: the smallest power of two whose weight shard leaves a
    fifth of the engine's memory to its KV cache"""
    offload_during_rollout: bool = False
    """colocated: the trainer moves its weights, gradients and optimizer state to host memory while vLLM
    generates (verl's param/grad/optimizer offload, NeMo-RL's colocated refit); rl/train.py keeps them on
    the GPU today"""
    sleep_level: int = 1
    """colocated: vLLM's sleep level while the trainer trains: 1 keeps the engine's weights in host memory (what
    rl.rollout.VLLMEngine.sleep does today), 2 drops them (the weight sync refills them anyway)"""
    moe_imbalance: float = field(default=1.0, metadata={"metavar": "X"})
    """routed tokens on the busiest expert rank relative to an even spread (RL runs without a balancing
    loss: measure MCore's tokens-per-expert on a few steps and raise this)"""


@dataclass(frozen=True)
class Speed:
    """Peak figures and the fractions of them a run reaches (the step-time estimate)."""
    gpu_tflops: float = 989.0
    """dense bf16 peak of one GPU, TFLOP/s (H100 SXM 989, H20 148)"""
    hbm_tbs: float = 3.35
    """memory bandwidth of one GPU, TB/s (H100 SXM 3.35, H20 4.0)"""
    train_mfu: float = 0.25
    """fraction of the peak the trainer's forward/backward reaches (Megatron MoE training: 0.2-0.4)"""
    prefill_mfu: float = 0.4
    """fraction of the peak vLLM's prefill reaches"""
    rollout_mbu: float = 0.5
    """fraction of the memory bandwidth vLLM's decode reaches (each step reads the weights and the KV cache)"""
    host_optimizer_gbs: float = 10.0
    """optim.cpu_offload: host memory bandwidth one rank's CPU Adam step reaches, GB/s (a node's bandwidth shared
    by its ranks); the step reads and writes 28 bytes per offloaded parameter"""
    sync_gbs: float = 20.0
    """trainer -> engine weight transfer, GB/s (NCCL or CUDA IPC, bucketed)"""
    prompt_tokens: Optional[int] = None
    """mean prompt length in tokens; default: half of data.max_prompt_tokens"""
    response_tokens: Optional[int] = None
    """mean response length in tokens; default: half of rollout.max_tokens"""
    max_num_seqs: int = 256
    """sequences one engine decodes at once at most (vLLM's max_num_seqs)"""


def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal under it), whitespace collapsed."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--field-name`` flag per field of ``cls``, its help the field's docstring and default."""
    group = parser.add_argument_group(cls.__doc__.strip().rstrip("."))
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.default is False:
            group.add_argument(flag, action="store_true", help=docs[f.name])
            continue
        kind = int if "int" in str(f.type) else float
        shown = "" if f.default is None else f" (default {f.default:g})"
        metavar = f.metadata.get("metavar", f.name.split("_")[-1].upper())
        group.add_argument(flag, type=kind, default=f.default, metavar=metavar,
                           help=docs[f.name] + shown)


def from_args(args: argparse.Namespace, cls):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
