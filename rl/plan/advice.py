"""What to change when a plan does not fit: candidate changes, each re-planned, the first that fit named.

    suggest(cfg, plan, replan)   # replan(overrides, cluster_changes) -> Plan (PlanError for impossible ones)

Candidates, cheapest first: the optimizer state to the host (``optim.cpu_offload``), full recompute, a
micro-batch of one, twice the pipeline stages (at the same world: half the data parallelism), twice
the expert parallelism; colocated: the trainer offloaded while vLLM generates, vLLM's weights dropped
in its sleep, a smaller vLLM share of the GPU; a wider vLLM tensor parallelism (2, 4 or 8 times: the
narrowest that fits); twice the GPUs. A suggestion is printed only when the re-plan with it fits, with
the GB it leaves on the largest GPU; when no single change does, the first pair that does.
Leaves out: searching layouts from scratch (the user's layout is the starting point).
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional

from rl.plan.core import Plan, PlanError

Candidate = tuple[str, list, dict]


def candidates(cfg, plan: Plan) -> list[Candidate]:
    s, o, lay, cl = cfg.model, cfg.optim, plan.layout, plan.cluster
    out: list[Candidate] = []
    if not o.cpu_offload and o.distributed and cfg.ray.gpus_per_trainer > 0:
        out.append(("optim.cpu_offload=true", ["optim.cpu_offload=true"], {}))
    if s.recompute != "full":
        out.append(("model.recompute=full", ["model.recompute=full"], {}))
    if cfg.run.micro_batch_size > 1:
        out.append(("run.micro_batch_size=1", ["run.micro_batch_size=1"], {}))
    if s.dp % 2 == 0:
        move = [f"model.pp={2 * s.pp}", f"model.dp={s.dp // 2}"]
        uneven = [f"model.{k}=null" for k in ("pp_first_layers", "pp_last_layers") if getattr(s, k) is not None]
        out.append((" ".join(move), move + uneven, {}))
    if plan.model["experts"] and plan.model["experts"] % (2 * s.ep) == 0:
        out.append((f"model.ep={2 * s.ep}", [f"model.ep={2 * s.ep}"], {}))
    if cfg.ray.mode == "colocated":
        if not cl["offload_during_rollout"]:
            out.append(("--offload-during-rollout", [], {"offload_during_rollout": True}))
        if cl["sleep_level"] == 1:
            out.append(("--sleep-level 2", [], {"sleep_level": 2}))
        util = round(cfg.rollout.gpu_memory_utilization - 0.1, 2)
        if util >= 0.2 and not cfg.rollout.kv_cache_bytes:
            out.append((f"rollout.gpu_memory_utilization={util}", [f"rollout.gpu_memory_utilization={util}"], {}))
    heads = plan.model["heads"]
    out += [(f"--rollout-tp {k * plan.engine.tp}", [], {"rollout_tp": k * plan.engine.tp}) for k in (2, 4, 8)
            if heads % (k * plan.engine.tp) == 0]
    if cfg.ray.mode == "colocated":
        out.append((f"--gpus {2 * lay['gpus']}", [], {"gpus": 2 * lay["gpus"]}))
    else:
        more = lay["gpus"] + lay["world"]
        out.append((f"model.dp={2 * s.dp} --gpus {more}", [f"model.dp={2 * s.dp}"], {"gpus": more}))
    return out


def _try(replan: Callable, changes: list[Candidate]) -> Optional[Plan]:
    overrides = [x for _, o, _ in changes for x in o]
    cluster = {k: v for _, _, c in changes for k, v in c.items()}
    try:
        return replan(overrides, cluster)
    except PlanError:
        return None
    except ValueError:  # a combination rl.config refuses
        return None


def suggest(cfg, plan: Plan, replan: Callable, most: int = 2) -> list[str]:
    """Up to ``most`` single changes that make ``plan`` fit (or one pair), each as 'change (largest GPU X GB)'."""
    if plan.fits:
        return []
    found, flags = [], set()
    options = candidates(cfg, plan)
    for option in options:
        flag = option[0].split()[0]
        if flag in flags:  # one --rollout-tp: the smallest that fits
            continue
        p = _try(replan, [option])
        if p is not None and p.fits:
            flags.add(flag)
            found.append(f"{option[0]} (largest GPU then {p.worst['gb']:.1f} GB)")
            if len(found) == most:
                return found
    if found:
        return found
    for a, b in itertools.combinations(options, 2):
        p = _try(replan, [a, b])
        if p is not None and p.fits:
            return [f"{a[0]} and {b[0]} (largest GPU then {p.worst['gb']:.1f} GB)"]
    return []
