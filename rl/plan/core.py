"""The plan of one run: the trainer config, the model's config.json and the cluster in, per-stage and
per-GPU memory, the host, a verdict and a step-time estimate out.

    plan = make_plan("rl/configs/deepseek_v3_671b.yaml", ["run.micro_batch_size=2"], hf_config, Cluster(), Speed())
    plan.fits, plan.worst, plan.stages[0].train

The config is loaded exactly as rl/train.py loads it (``rl.config.load_config``), so an unknown or
ill-typed override is the same one-line error; ``Cluster.gpus`` becomes ``model.dp`` when colocated.
MTP layers are left out (RL trains without them). Every impossible layout is a ``PlanError`` line.
Leaves out: the suggestions (rl.plan.advice, which re-plans) and printing (rl.plan.report).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from rl.plan import layout as L
from rl.plan import memory as M
from rl.plan import params as P
from rl.plan import timing
from rl.plan.assume import Cluster, Speed

PlanError = L.PlanError


@dataclass(frozen=True)
class Plan:
    """What a run needs, and whether the cluster has it."""
    model: dict
    """family, name, parameters (total, active per token), layers, experts, attention heads"""
    layout: dict
    """the trainer's parallel sizes, sequence length, micro-batches, where the engines run"""
    stages: tuple
    """one rl.plan.memory.Stage per pipeline rank"""
    engine: M.Engine
    """one rollout-engine GPU"""
    host_node: float
    """GB of host memory on the busiest node"""
    worst: dict
    """the largest GPU need: where ("trainer" or "engine"), stage, rank, phase, gb"""
    fits: bool
    """every GPU and node within Cluster.gpu_gb / host_gb, and the KV cache holds a full sequence"""
    problems: tuple
    """one line per limit exceeded"""
    time: dict
    """rl.plan.timing.step"""
    cluster: dict
    """the Cluster assumed"""
    speed: dict
    """the Speed assumed"""
    notes: tuple
    """what the reader should know (MTP left out, engines the trainer cannot start yet, ...)"""


def load(path, overrides: list[str], cl: Cluster):
    """The TrainConfig, with model.dp from ``cl.gpus`` when colocated."""
    from rl.config import load_config

    if not cl.gpus:
        return load_config(path, overrides)
    # the layout's sizes first; ep and etp set aside, as their check needs the world --gpus decides
    probe = load_config(path, [*overrides, "model.ep=1", "model.etp=1"])
    if probe.ray.mode != "colocated":
        return load_config(path, overrides)
    per = probe.model.tp * probe.model.pp * probe.model.cp
    if cl.gpus % per:
        raise PlanError(f"--gpus {cl.gpus} is not a multiple of tp*pp*cp = {per} (colocated: every GPU is a trainer "
                        "rank); choose a multiple")
    return load_config(path, [*overrides, f"model.dp={cl.gpus // per}"])


def read_model(hf_config: dict, source: str):
    """The family's ModelConfig without MTP layers, and its name."""
    from mapping.family import ConfigError
    from mapping.registry import family_for

    try:
        m = family_for(hf_config, source).read_config(hf_config)
    except KeyError as err:
        raise PlanError(f"{source}: field {err} is missing") from None
    except ConfigError as err:
        raise PlanError(str(err)) from None
    return dataclasses.replace(m, transformer={**m.transformer, "mtp_num_layers": None})


def placement(cfg, m, lay, cl: Cluster) -> tuple[int, int, int]:
    """(rollout tp, engines, GPUs in all)."""
    tp = cl.rollout_tp or M.auto_rollout_tp(m, cfg, cl)
    if m.transformer["num_attention_heads"] % tp:
        raise PlanError(f"--rollout-tp {tp} does not divide the model's {m.transformer['num_attention_heads']} "
                        "attention heads (vLLM splits them); choose one that does")
    if cfg.ray.mode == "colocated":
        if lay.world % tp:
            raise PlanError(f"colocated: vLLM at tensor parallel size {tp} must fit the trainer's {lay.world} GPUs "
                            "evenly; change --rollout-tp or the trainer's world")
        return tp, lay.world // tp, lay.world
    if cl.gpus is None:
        return tp, 1, lay.world + tp
    if cl.gpus - lay.world < tp:
        raise PlanError(f"--gpus {cl.gpus} leaves {cl.gpus - lay.world} GPUs besides the trainer's {lay.world}; one "
                        f"engine needs {tp} (--rollout-tp); add GPUs or use ray.mode=colocated")
    return tp, (cl.gpus - lay.world) // tp, cl.gpus


def make_plan(path, overrides: list[str], hf_config: dict, cl: Cluster, sp: Speed,
              source: str = "config.json", name: Optional[str] = None) -> Plan:
    cfg = load(path, overrides, cl)
    m = read_model(hf_config, source)
    lay = L.layout(cfg.model, m)
    tp, engines, gpus = placement(cfg, m, lay, cl)
    eng = M.engine(m, cfg, cl, tp, engines)
    batch = M.batch_bytes(cfg, m)
    mb = M.micro_batches(cfg)
    stages = tuple(M.trainer_stage(cfg, m, lay, r, cl, eng, batch, mb) for r in range(lay.pp))
    host = host_node(cfg, stages, eng, cl)
    worst, problems = verdict(cfg, lay, stages, eng, host, cl)
    total, active = P.model_params(m)
    seq = min(cfg.rollout.max_model_len, cfg.data.max_prompt_tokens + cfg.rollout.max_tokens)
    notes = ["MTP layers left out (RL trains without them)"] if hf_config.get("num_nextn_predict_layers") else []
    notes += [n for n in [P.hook_note(m)] if n]
    if engines > 1 or tp > 1:
        notes.append(f"rl/train.py starts one vLLM engine at tensor parallel size 1 today (rl/actors.py); this plan "
                     f"places {engines} engine(s) at TP {tp}")
    return Plan(
        model=dict(family=m.family, name=name or source, params=total, active_params=active, layers=m.num_layers,
                   experts=m.num_experts, moe_layers=len(m.moe_layers), heads=m.transformer["num_attention_heads"]),
        layout=dict(tp=lay.tp, pp=lay.pp, vpp=lay.vpp, ep=lay.ep, etp=lay.etp, cp=lay.cp, dp=lay.dp, world=lay.world,
                    expert_dp=lay.expert_dp, mode=cfg.ray.mode, gpus=gpus, seq=seq, micro_batch=cfg.run.micro_batch_size,
                    micro_batches=mb, recompute=cfg.model.recompute, dtype=cfg.model.dtype, spec=cfg.model.spec,
                    distributed_optimizer=cfg.optim.distributed,
                    cpu_offload=cfg.optim.offload_fraction if cfg.optim.cpu_offload else 0.0),
        stages=stages, engine=eng, host_node=host, worst=worst, fits=not problems, problems=tuple(problems),
        time=timing.step(m, cfg, sp, lay, eng, mb, max(s.optimizer_host for s in stages)),
        cluster=dataclasses.asdict(cl), speed=dataclasses.asdict(sp), notes=tuple(notes))


def host_node(cfg, stages, eng: M.Engine, cl: Cluster) -> float:
    """GB of host memory on the busiest node (its GPUs all of one kind: the busiest stage's, or engines')."""
    trainer = max(s.host for s in stages) * cl.gpus_per_node
    if cfg.ray.mode == "colocated":  # each GPU also runs an engine worker, asleep (level 1: weights in host memory)
        return trainer + ((eng.weights if cl.sleep_level == 1 else 0.0) + cl.host_process_gb) * cl.gpus_per_node
    return max(trainer, cl.host_process_gb * cl.gpus_per_node)


def verdict(cfg, lay, stages, eng: M.Engine, host: float, cl: Cluster) -> tuple[dict, list[str]]:
    """The largest GPU need and one line per limit exceeded."""
    needs = []
    for s in stages:
        rank = s.stage * lay.tp * lay.cp * lay.dp  # MCore orders ranks tp, cp, ep/dp, pp: a stage's first rank
        needs.append(dict(where="trainer", stage=s.stage, rank=rank, phase="training", gb=s.train))
        if s.generate is not None:
            needs.append(dict(where="trainer", stage=s.stage, rank=rank, phase="generation", gb=s.generate))
    if cfg.ray.mode == "disaggregated":
        needs.append(dict(where="engine", stage=None, rank=lay.world, phase="generation", gb=eng.total))
    worst = max(needs, key=lambda n: n["gb"])
    problems = []
    over = {(n["where"], n["stage"]) for n in needs if n["gb"] > cl.gpu_gb}
    if over:
        more = f" ({len(over) - 1} more stages or engines over)" if len(over) > 1 else ""
        problems.append(f"{describe(worst)} needs {worst['gb']:.1f} GB of {cl.gpu_gb:g}{more}")
    if eng.kv_cache <= 0:
        problems.append(f"the engine's weights ({eng.weights:.1f} GB per GPU at TP {eng.tp}) leave no room for a KV "
                        "cache in rollout.gpu_memory_utilization of the GPU")
    elif eng.full_sequences < 1:
        problems.append(f"the engine's KV cache ({eng.kv_cache:.1f} GB per GPU at TP {eng.tp}) holds no full "
                        f"{cfg.rollout.max_model_len}-token sequence")
    if host > cl.host_gb:
        problems.append(f"host memory: a node needs {host:.0f} GB of {cl.host_gb:g}")
    return worst, problems


def describe(need: dict) -> str:
    if need["where"] == "engine":
        return f"an engine GPU (rank {need['rank']}) while generating"
    while_ = "training" if need["phase"] == "training" else "vLLM generates"
    return f"stage {need['stage']} rank {need['rank']} while {while_}"
