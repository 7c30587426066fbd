"""Megatron-Core's own training stack for the policy: this rank's model chunks (its pipeline stage,
or its virtual stages), wrapped in MCore's `DistributedDataParallel`, the optimizer from
`get_megatron_optimizer` (the distributed optimizer by default: fp32 master weights and Adam moments
sharded over data parallel, expert parameters over expert data parallel), MCore's
`OptimizerParamScheduler` for the learning rate, and the config hooks the pipeline schedules call
(`finalize_model_grads`, `no_sync`, the loss scale).

    chunks = build_chunks(m, cfg.model, dtype)             # [GPTModel], one per virtual stage
    stack = make_stack(chunks, cfg.optim, dtype, updates)  # DDP chunks, optimizer, scheduler
    ... get_forward_backward_func()(..., model=stack.chunks, ...)   (rl.schedule)
    norm, lr = stack.step()

How the trainer's GRPO loss meets MCore's gradient scaling: the model config asks for
`calculate_per_token_loss`, under which DDP sums gradients over data (and context) parallel ranks and
`finalize_model_grads` divides them by the number of loss units the loss functions reported, summed
over micro-batches and data-parallel ranks (rl.schedule reports each micro-batch's share of the
aggregation's denominator: tokens for token-mean, sequences for the seq-mean variants). The result is
exactly the gradient of the global-batch loss of rl.grpo, whatever the micro-batching and layout.
`finalize_model_grads` also sums sequence-parallel and q/k-norm gradients over TP, the tied
embedding's over the first and last stage, and expert gradients over expert data parallel.

Everything here is Megatron-Core's; the CPU patches it needs are `runtime.patches.megatron_train`
(applied by `make_stack` and `build_chunks` on a machine without CUDA). MTP layers are never built
for RL (mtp_num_layers = None: every published GRPO recipe turns MTP off); a converted checkpoint's
MTP weights are simply not read.
Leaves out: the fp16 loss scaler (bf16 and fp32 only), Megatron FSDP. Without it the trainer would
keep its own optimizer, replicated over data parallel, and could not run a 671B model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime import megatron as rt
from runtime import patches

RESHARDABLE = {"distrib_optim_sharding_type": "fully_reshardable",
               "distrib_optim_fully_reshardable_mem_efficient": True}
"""Optimizer checkpoint format: the only one that reshards across pipeline sizes (PLATFORM.md)."""


# ------------------------------------------------------------------------------ layout
def check_layout(sec, m) -> None:
    """One-line errors (rl.plan.layout.PlanError, a ValueError) for a layout Megatron-Core cannot build
    for model `m`: layers that do not split into the (virtual) stages, tp not dividing the heads, key/value
    groups or vocabulary, ep not dividing the experts, ep x etp not dividing the ranks of a stage.
    The same rule rl.plan plans with, checked before any process starts."""
    from rl.plan.layout import layout

    layout(sec, m)


# ------------------------------------------------------------------------------ model
RECOMPUTE = {"none": {}, "full": {"recompute_granularity": "full"}, "selective": {"recompute_granularity": "selective"}}


def megatron_config(m, sec, dtype: torch.dtype, routing_replay: bool = False):
    """The TransformerConfig the trainer builds: the family's, at the configured layout, with the RL
    MoE settings, pipeline split, recompute and per-token loss scaling."""
    kw = {"calculate_per_token_loss": True, "mtp_num_layers": None, **RECOMPUTE[sec.recompute]}
    if sec.recompute == "full":
        kw.update(recompute_method=sec.recompute_method, recompute_num_layers=sec.recompute_num_layers)
    elif sec.recompute == "selective":
        kw.update(recompute_modules=list(sec.recompute_modules))
    if m.num_experts:
        kw.update(moe_router_load_balancing_type=sec.moe_router_load_balancing_type,
                  moe_aux_loss_coeff=sec.moe_aux_loss_coeff,
                  moe_router_bias_update_rate=sec.moe_router_bias_update_rate,
                  moe_enable_routing_replay=routing_replay)
    if sec.pp > 1:
        kw.update(num_layers_in_first_pipeline_stage=sec.pp_first_layers,
                  num_layers_in_last_pipeline_stage=sec.pp_last_layers,
                  virtual_pipeline_model_parallel_size=sec.vpp)
    if not rt.has_cuda() and m.num_experts:
        kw["moe_token_dispatcher_type"] = "allgather"  # alltoall creates CUDA streams
    config = rt.transformer_config(m, tp=sec.tp, pp=sec.pp, ep=sec.ep, etp=sec.etp, cp=sec.cp, dtype=dtype, **kw)
    if sec.pp > 1 and not sec.vpp:
        # Micro-batches differ in length (each is cut to its longest row), so stages exchange shapes
        # before activations. MCore's config refuses the flag with the allgather dispatcher (CPU), which
        # gathers equal token counts across EP ranks: rl.schedule aligns every micro-batch across them.
        # With virtual stages rl.schedule cuts all micro-batches to one length instead (fixed shapes).
        config.variable_seq_lengths = True
    return config


def build_chunks(m, sec, dtype: torch.dtype, routing_replay: bool = False) -> list:
    """This rank's GPTModel chunks (one per virtual pipeline stage) for family config `m`."""
    rt.setup()
    patches.apply(patches.megatron_train.AT_TRAIN)
    config = megatron_config(m, sec, dtype, routing_replay)
    kw = m.gpt_model_kwargs()
    return [rt.build_gpt_model(config, spec=sec.spec, family=m.family, vp_stage=vp, **kw).to(rt.device())
            for vp in (range(sec.vpp) if sec.vpp else [None])]


# ------------------------------------------------------------------------------ optimizer
@dataclass
class Stack:
    """DDP-wrapped chunks, the MCore optimizer and its lr schedule."""
    chunks: list
    optimizer: object
    scheduler: object

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> tuple[float, float]:
        """Clip and apply the finished gradients; advance the schedule. (grad norm before clipping, lr used)."""
        lr = self.optimizer.param_groups[0]["lr"]
        ok, norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("the optimizer skipped the step (non-finite gradients)")
        if norm is None or not torch.isfinite(torch.tensor(float(norm))):
            raise FloatingPointError(f"gradient norm is {norm}: lower optim.lr or check the data for empty responses")
        self.scheduler.step(increment=1)
        return float(norm), float(lr)


def optimizer_config(o, dtype: torch.dtype):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.lr * o.min_lr_ratio, weight_decay=o.weight_decay,
        adam_beta1=float(o.betas[0]), adam_beta2=float(o.betas[1]), adam_eps=o.eps, clip_grad=o.grad_clip,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        use_distributed_optimizer=o.distributed, overlap_param_gather=o.overlap_param_gather,
        optimizer_cpu_offload=o.cpu_offload, optimizer_offload_fraction=o.offload_fraction if o.cpu_offload else 0.0)


def make_stack(chunks: list, o, dtype: torch.dtype, total_updates: int) -> Stack:
    """Wrap `chunks` in MCore's DDP, build the optimizer and the schedule, and set the config hooks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    patches.apply(patches.megatron_train.AT_TRAIN)
    if o.cpu_offload and not rt.has_cuda():
        raise ValueError("optim.cpu_offload=true on a trainer without CUDA: there is nothing to offload; "
                         "set optim.cpu_offload=false")
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=o.overlap_grad_reduce,
                                               overlap_param_gather=o.overlap_param_gather,
                                               use_distributed_optimizer=o.distributed, check_for_nan_in_grad=True)
    wrapped = [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
               for i, chunk in enumerate(chunks)]
    optimizer = get_megatron_optimizer(optimizer_config(o, dtype), wrapped)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.lr * o.min_lr_ratio, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(total_updates, o.warmup_steps + 1), lr_decay_style=o.schedule,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(total_updates, 1), wd_incr_style="constant")
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    syncs = [w.no_sync for w in wrapped]
    config.no_sync_func = syncs[0] if len(syncs) == 1 else syncs
    if o.overlap_grad_reduce:
        grads = [w.start_grad_sync for w in wrapped]
        config.grad_sync_func = grads[0] if len(grads) == 1 else grads
    if o.overlap_param_gather:
        params = [w.start_param_sync for w in wrapped]
        config.param_sync_func = params[0] if len(params) == 1 else params
    return Stack(wrapped, optimizer, scheduler)
