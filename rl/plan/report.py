"""The plan as text: the model and layout, a table of one trainer rank per pipeline stage, the engine
GPU, the host, the step time with its assumptions, and the verdict line last (what scripts grep).
Leaves out: the JSON form (``python -m rl.plan --json`` prints ``dataclasses.asdict`` of the plan).
"""
from __future__ import annotations

from rl.plan.core import Plan, describe

COLUMNS = (("weights", "weights"), ("grads", "grads"), ("optimizer", "optim"), ("activations", "activ"),
           ("recompute", "recomp"), ("logits", "logits"), ("routing", "R3"), ("reference", "ref"), ("sync", "sync"))


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def header(p: Plan) -> list[str]:
    m, lay = p.model, p.layout
    experts = f", {m['experts']} experts in {m['moe_layers']} MoE layers" if m["experts"] else ""
    opt = ("distributed optimizer" if lay["distributed_optimizer"] else "replicated optimizer") + (
        f", {lay['cpu_offload']:g} of it on the host" if lay["cpu_offload"] else "")
    e = p.engine
    where = "on the trainer's GPUs, asleep while it trains" if lay["mode"] == "colocated" else "on their own GPUs"
    return [
        f"model: {m['name']} ({m['family']}): {_b(m['params'])} parameters, {_b(m['active_params'])} active per "
        f"token, {m['layers']} layers{experts}",
        f"trainer: {lay['world']} GPUs = tp {lay['tp']} x pp {lay['pp']}{'' if not lay['vpp'] else ' (vpp %d)' % lay['vpp']}"
        f" x cp {lay['cp']} x dp {lay['dp']}; ep {lay['ep']}, etp {lay['etp']}, expert dp {lay['expert_dp']}; "
        f"{lay['dtype']} {lay['spec']}, {opt}",
        f"micro-batch: {lay['micro_batch']} x {lay['seq']} tokens, {lay['micro_batches']} per optimizer step per DP "
        f"rank, recompute {lay['recompute']}",
        f"engines: {e.engines} vLLM x TP {e.tp} ({lay['mode']}, {where}); {lay['gpus']} GPUs in all",
    ]


def stage_table(p: Plan) -> list[str]:
    gen = p.layout["mode"] == "colocated"
    head = f"{'stage':>5} {'layers':>9} {'params':>8} " + " ".join(f"{c:>6}" for _, c in COLUMNS)
    head += f" {'TRAIN':>6}" + (f" {'GEN':>6}" if gen else "") + f" {'host':>6}"
    lines = ["trainer, one rank of each pipeline stage (GB; optim = on the GPU, its host part under host):", head]
    for s in p.stages:
        row = f"{s.stage:>5} {s.layers:>9} {_b(sum(s.params.values())):>8} "
        row += " ".join(f"{getattr(s, k):6.2f}" for k, _ in COLUMNS) + f" {s.train:6.1f}"
        row += (f" {s.generate:6.1f}" if gen else "") + f" {s.host:6.1f}"
        lines.append(row)
    lines.append("  TRAIN includes --reserve-gb; GEN = what stays of the trainer while vLLM generates, plus the engine")
    return lines


def engine_lines(p: Plan) -> list[str]:
    e = p.engine
    kept = "to host memory" if p.cluster["sleep_level"] == 1 else "dropped"
    sleep = f"; sleep frees {e.sleep_frees:.1f} GB (weights {kept}, KV cache dropped)" if e.sleep_frees else ""
    return [f"engine GPU (vLLM TP {e.tp}): weights {e.weights:.1f} GB, KV cache {e.kv_cache:.1f} GB = {e.kv_tokens:,} "
            f"tokens ({e.full_sequences} full sequences), with the sync bucket and reserve {e.total:.1f} GB{sleep}"]


def time_lines(p: Plan) -> list[str]:
    t, sp = p.time, p.speed
    r, tr = t["rollout"], t["train"]
    how = "generation overlaps training" if t["overlapped"] else "one after the other"
    return [
        f"step time (assumed: {sp['gpu_tflops']:g} TFLOP/s and {sp['hbm_tbs']:g} TB/s per GPU, train MFU "
        f"{sp['train_mfu']:g}, prefill MFU {sp['prefill_mfu']:g}, decode bandwidth use {sp['rollout_mbu']:g}, sync "
        f"{sp['sync_gbs']:g} GB/s):",
        f"  rollout {r['seconds']:.0f} s (prefill {r['prefill_s']:.0f} s, decode {r['decode_s']:.0f} s at "
        f"{r['concurrent_sequences']} sequences per engine; {r['tokens_per_s']:,.0f} generated tokens/s)",
        f"  training {tr['seconds']:.0f} s (log-prob passes {tr['logprobs_s']:.0f} s, train {tr['train_s']:.0f} s"
        + (f", CPU optimizer {tr['host_optimizer_s']:.0f} s" if tr["host_optimizer_s"] else "") + "; "
        f"{tr['flops']:.2e} FLOPs over {tr['tokens']:,} tokens), weight sync {t['sync_s']:.0f} s",
        f"  step {t['seconds']:.0f} s ({how}): bound by {t['dominant']}",
    ]


def render(p: Plan, suggestions: list[str]) -> str:
    lines = header(p) + [""] + stage_table(p) + [""] + engine_lines(p)
    lines.append(f"host: {p.host_node:.0f} GB on the busiest node of {p.cluster['gpus_per_node']} GPUs "
                 f"(of {p.cluster['host_gb']:g})")
    lines += [""] + time_lines(p) + [f"note: {n}" for n in p.notes] + [""]
    if p.fits:
        lines.append(f"fits: the largest GPU need is {describe(p.worst)}: {p.worst['gb']:.1f} GB of "
                     f"{p.cluster['gpu_gb']:g}")
    else:
        tail = f"; try {' or '.join(suggestions)}" if suggestions else "; no single change from rl.plan.advice fits"
        lines.append(f"does not fit: {'; '.join(p.problems)}{tail}")
    return "\n".join(lines)
