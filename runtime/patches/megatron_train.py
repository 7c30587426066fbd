"""Patches for megatron-core 0.16.1's training stack (DDP, optimizers, gradient clipping, pipeline
schedules, activation recompute, distributed-optimizer checkpoints) on a CPU without Transformer
Engine or Apex. ``AT_TRAIN`` is what ``rl.stack`` applies before it builds a trainer.

Most of the stack is device-agnostic and only spells "CUDA" in a few places: those functions run
unchanged under ``cuda_shim.on_cpu`` (CUDA factory arguments -> CPU, ``.cuda()`` -> itself, the
dtype checks' ``'torch.cuda.FloatTensor'`` strings answered for CPU tensors). Three defects are
not about devices at all and also bite a GPU run that uses torch's Adam (no TE, no Apex); they are
applied wherever TE is not importable. One probe script reproduces all of them in a fresh process
(``_probe_all``; CUDA hidden, TE unimportable) and reports each patch DEFECT or FIXED.
"""
from __future__ import annotations

import torch

from runtime.patches.base import Patch, run_probe
from runtime.patches.cuda_shim import wrap
from runtime.patches.megatron_core import _PRELUDE, UPSTREAM, _on_cpu, _te_importable


# --------------------------------------------------------------------------- device spellings
OPTIMIZER_TARGETS = (
    ("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer", "__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer", "__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "_build_model_and_main_param_groups"),
)
CLIP_FUNCTIONS = ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32", "count_zeros_fp32")
SCHEDULES = ("forward_backward_no_pipelining", "forward_backward_pipelining_without_interleaving",
             "forward_backward_pipelining_with_interleaving")


def _module(name: str):
    import importlib

    return importlib.import_module(name)


def optimizer_on_cpu() -> None:
    """MCore's optimizer constructors and gradient-norm / clipping functions run on CPU tensors."""
    if not _on_cpu():
        return
    for module, cls, attr in OPTIMIZER_TARGETS:
        wrap(getattr(_module(module), cls), attr)
    clip = _module("megatron.core.optimizer.clip_grads")
    users = [_module("megatron.core.optimizer.optimizer"), _module("megatron.core.optimizer.distrib_optimizer")]
    for name in CLIP_FUNCTIONS:
        wrap(clip, name)
        for user in users:  # they imported the originals by name
            if hasattr(user, name):
                setattr(user, name, getattr(clip, name))


def schedules_on_cpu() -> None:
    """The pipeline schedules' token counter (``device="cuda"``) is made on the CPU."""
    if not _on_cpu():
        return
    schedules = _module("megatron.core.pipeline_parallel.schedules")
    for name in SCHEDULES:
        wrap(schedules, name)


def tied_embeddings_on_cpu() -> None:
    """At pp > 1, the last stage's copy of tied embeddings is synchronised without ``.cuda()``."""
    if not _on_cpu():
        return
    from megatron.core.models.common.language_module.language_module import LanguageModule

    wrap(LanguageModule, "setup_embeddings_and_output_layer")


# --------------------------------------------------------------------------- recompute
def _device_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_device_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def recompute_rng_on_cpu() -> None:
    """Activation recompute saves and restores "the device's" RNG state: on CPU, the CPU generator's."""
    if not _on_cpu():
        return
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _device_rng_state
    mrandom._set_cuda_rng_state = _set_device_rng_state


def _fp8_only_when_asked(init):
    def __init__(self, fp8=False):
        init(self, fp8)
        self.fp8 = fp8 not in (None, False)
    return __init__


def selective_recompute_without_te() -> None:
    """``CheckpointWithoutOutput()`` (default ``fp8=False``) no longer reads as an fp8 checkpoint."""
    if _te_importable():
        return
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    wrap(CheckpointWithoutOutput, "__init__", _fp8_only_when_asked)


# --------------------------------------------------------------------------- torch Adam state on load
def _with_step(fn):
    """Give every parameter an Adam state with a ``step`` before MCore reads the steps: a fresh
    optimizer has no state (its zero moments and step 0 are what Adam starts from anyway)."""
    def wrapper(self, *args, **kwargs):
        for opt in _torch_optimizers(self):
            if getattr(self, "init_state_fn", None) is not None:
                self.init_state_fn(opt, self.config)
            for group in opt.param_groups:
                for p in group["params"]:
                    opt.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))
        return fn(self, *args, **kwargs)
    return wrapper


def _keep_step_no_grad(fn):
    """Copy the loaded tensors into the main parameter and its moments (under no_grad: an fp32
    main parameter is the model's own leaf), keeping the Adam ``step`` the checkpoint does not
    carry per parameter."""
    def wrapper(self, model_param, tensors):
        group, order = self.model_param_group_index_map[model_param]
        main = self.optimizer.param_groups[group]["params"][order]
        step = self.optimizer.state[main].get("step")
        if step is not None and "step" not in tensors:
            tensors = {**tensors, "step": step}
        with torch.no_grad():
            return fn(self, model_param, tensors)
    return wrapper


def _own_steps(fn):
    """After ``load_state_dict``, each parameter's Adam ``step`` is its own tensor (MCore assigns
    one shared tensor, which torch's Adam then increments once per parameter)."""
    def wrapper(self, *args, **kwargs):
        out = fn(self, *args, **kwargs)
        for opt in _torch_optimizers(self):
            seen: set[int] = set()
            for state in opt.state.values():
                step = state.get("step")
                if isinstance(step, torch.Tensor):
                    if id(step) in seen:
                        state["step"] = step.clone()
                    seen.add(id(state["step"]))
        return out
    return wrapper


def _torch_optimizers(megatron_optimizer):
    inner = getattr(megatron_optimizer, "optimizer", None)
    return [inner] if isinstance(inner, torch.optim.Optimizer) else []


def adam_step_on_load() -> None:
    """Resuming a distributed optimizer over torch's Adam: ``step`` exists before it is read and
    survives the per-parameter state copy."""
    if _te_importable():
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    wrap(DistributedOptimizer, "sharded_state_dict", _with_step)
    wrap(DistributedOptimizer, "_set_main_param_and_optimizer_states", _keep_step_no_grad)


def adam_shared_step() -> None:
    """See ``_own_steps``: the silent one (the load looks exact; the next update is off)."""
    if _te_importable():
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    wrap(DistributedOptimizer, "load_state_dict", _own_steps)


# --------------------------------------------------------------------------- probes
_PROBE_ALL = r"""
import os, tempfile
import torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(__import__("runtime.net", fromlist=["x"]).free_port()))
from runtime import megatron as rt
from runtime.patches import megatron_train as mt
rt.init_distributed()

def attempt(name, fn):
    try:
        fn()
    except (AssertionError, RuntimeError, TypeError, NameError, KeyError) as err:
        report(name, True, f"{type(err).__name__}: {str(err)[:160]!r}")
        return False
    return True

from megatron.core.tensor_parallel import random as R
x = torch.ones(3, requires_grad=True)
if attempt("recompute_rng_on_cpu", lambda: R.checkpoint(lambda t: t * 2, False, x).sum().backward()):
    report("recompute_rng_on_cpu", False, "tensor_parallel.checkpoint ran forward and backward on CPU")
c = R.CheckpointWithoutOutput()
report("selective_recompute_without_te", c.fp8 is True, f"CheckpointWithoutOutput().fp8 = {c.fp8} without TE")

from megatron.core.transformer import TransformerConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
def gpt(pp=1):
    cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                            pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32 if pp > 1 else None)
    return GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=32, max_sequence_length=8,
                    share_embeddings_and_output_weights=True)
if attempt("tied_embeddings_on_cpu", lambda: gpt(pp=2)):
    report("tied_embeddings_on_cpu", False, "a pp=2-configured GPTModel with tied embeddings was built on CPU")

from megatron.core.pipeline_parallel import schedules
model = gpt()
def step(it, m):
    out = m(torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None], rt.causal_mask(4))
    return out, lambda o: (o.sum(), {})
run = lambda: schedules.get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[model],
                                                    num_microbatches=1, seq_length=4, micro_batch_size=1, forward_only=True)
if attempt("schedules_on_cpu", run):
    report("schedules_on_cpu", False, "forward_backward_no_pipelining ran on CPU")

from megatron.core.distributed import DistributedDataParallel as DDP, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
ddp = DDP(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
make = lambda: get_megatron_optimizer(OptimizerConfig(lr=1e-3, use_distributed_optimizer=True), [ddp])
if attempt("optimizer_on_cpu", make):
    report("optimizer_on_cpu", False, "get_megatron_optimizer built a distributed optimizer on CPU")
mt.optimizer_on_cpu()
opt = make()
RESHARDABLE = {"distrib_optim_sharding_type": "fully_reshardable", "distrib_optim_fully_reshardable_mem_efficient": True}
if attempt("adam_step_on_load", lambda: opt.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=RESHARDABLE)):
    report("adam_step_on_load", False, "a fresh optimizer's sharded_state_dict(is_loading=True) worked")
for p in model.parameters():
    p.main_grad.fill_(0.1)
opt.step()
opt.load_state_dict(opt.state_dict())
steps = [s["step"] for s in opt.optimizer.state.values()]
shared = len({id(s) for s in steps}) < len(steps)
report("adam_shared_step", shared, f"{len(steps)} Adam states hold {len({id(s) for s in steps})} distinct step tensors after load_state_dict")
dist.destroy_process_group()
"""

_PROBE_NAMES = ("recompute_rng_on_cpu", "selective_recompute_without_te", "tied_embeddings_on_cpu",
                "schedules_on_cpu", "optimizer_on_cpu", "adam_step_on_load", "adam_shared_step")
_CACHE: dict = {}


def _probe_all() -> dict:
    if "result" not in _CACHE:
        _CACHE["result"] = run_probe(["-c", _PRELUDE + _PROBE_ALL], timeout=180)
    return _CACHE["result"]


def _probe(name: str):
    def still_needed() -> bool:
        found = _probe_all()
        if name not in found:
            raise RuntimeError(f"the training-stack probe answered about {sorted(found)}, not {name!r}")
        return found[name][0]
    return still_needed


# --------------------------------------------------------------------------- records
_AT_TRAIN = "rl.stack, before it builds a trainer (CPU only; the Adam fixes wherever TE is absent)"
_OPT = "megatron/core/optimizer/"

PATCHES = (
    Patch("optimizer_on_cpu", UPSTREAM,
          _OPT + "optimizer.py (MixedPrecisionOptimizer, Float16OptimizerWithFloat16Params, FP32Optimizer: __init__), "
          "distrib_optimizer.py (DistributedOptimizer.__init__, _build_model_and_main_param_groups), clip_grads.py "
          "(get_grad_norm_fp32, clip_grad_by_total_norm_fp32, count_zeros_fp32; local_multi_tensor_l2_norm in utils.py)",
          "get_megatron_optimizer on CPU: 'Torch not compiled with CUDA enabled' (device='cuda' flags), then "
          "TypeError 'Wrapped parameters must be one of torch.cuda.FloatTensor...' (type-string checks)",
          optimizer_on_cpu, _probe("optimizer_on_cpu"), "process", _AT_TRAIN,
          "the optimizer takes devices from its parameters and checks dtypes, not CUDA type strings"),
    Patch("schedules_on_cpu", UPSTREAM,
          "megatron/core/pipeline_parallel/schedules.py (forward_backward_no_pipelining, "
          "forward_backward_pipelining_without_interleaving, forward_backward_pipelining_with_interleaving)",
          "every schedule starts with total_num_tokens = torch.zeros(..., device='cuda'): "
          "'Torch not compiled with CUDA enabled' before the first micro-batch",
          schedules_on_cpu, _probe("schedules_on_cpu"), "process", _AT_TRAIN,
          "the token counter is created on the model's device"),
    Patch("tied_embeddings_on_cpu", UPSTREAM,
          "megatron/core/models/common/language_module/language_module.py "
          "(LanguageModule.setup_embeddings_and_output_layer)",
          "pp > 1 with tied embeddings: weight.data.cuda() before the first/last-stage all-reduce: "
          "'Torch not compiled with CUDA enabled' while building the model",
          tied_embeddings_on_cpu, _probe("tied_embeddings_on_cpu"), "process", _AT_TRAIN,
          "the shared weight stays on its own device"),
    Patch("recompute_rng_on_cpu", UPSTREAM,
          "megatron/core/tensor_parallel/random.py (_get_cuda_rng_state, _set_cuda_rng_state)",
          "activation recompute (tensor_parallel.checkpoint) saves the CUDA RNG state: "
          "'Torch not compiled with CUDA enabled' in the first recomputed forward",
          recompute_rng_on_cpu, _probe("recompute_rng_on_cpu"), "process", _AT_TRAIN,
          "the checkpoint functions use the generator of the tensors' device"),
    Patch("selective_recompute_without_te", UPSTREAM,
          "megatron/core/tensor_parallel/random.py (CheckpointWithoutOutput.__init__: self.fp8 = fp8 is not None)",
          "the default fp8=False reads as fp8: selective recompute of layernorm / mla_up_proj / moe_act calls "
          "TE's FP8GlobalStateManager, which is absent without TE",
          selective_recompute_without_te, _probe("selective_recompute_without_te"), "process", _AT_TRAIN,
          "CheckpointWithoutOutput treats fp8=False as no fp8"),
    Patch("adam_step_on_load", UPSTREAM,
          _OPT + "distrib_optimizer.py (DistributedOptimizer.state_dict via sharded_state_dict, "
          "_set_main_param_and_optimizer_states)",
          "resuming with torch's Adam (no TE/Apex): a fresh optimizer's state has no 'step' (state_dict: "
          "KeyError/AssertionError), then the state copy raises KeyError 'step' and copies into a leaf "
          "that requires grad (fp32)",
          adam_step_on_load, _probe("adam_step_on_load"), "process", _AT_TRAIN,
          "the torch-Adam path initialises 'step' with the moments and copies only the loaded keys"),
    Patch("adam_shared_step", UPSTREAM,
          _OPT + "distrib_optimizer.py (DistributedOptimizer.load_state_dict: s['step'] = step for every state)",
          "SILENT: after a load every parameter shares one 'step' tensor, which torch's Adam increments once "
          "per parameter: the loaded state looks exact but the next update uses a wrong bias correction "
          "(~0.45 lr off on a tiny model)",
          adam_shared_step, _probe("adam_shared_step"), "process", _AT_TRAIN,
          "load_state_dict gives each state its own step tensor"),
)

AT_TRAIN = tuple(p.name for p in PATCHES)
"""What ``rl.stack`` applies, in this order."""
