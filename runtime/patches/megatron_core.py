"""Patches for megatron-core 0.16.1 defects that stop it from running on a CPU without
Transformer Engine. Each is a small function, applied once per process and only without CUDA
(with CUDA, and TE where it matters, upstream works as is), never by editing the installed package.

``AT_SETUP`` is what ``runtime.megatron.setup()`` applies before any model is built;
``cp_rope_on_cpu`` is applied by ``rl.policy`` when it builds a context-parallel model.

Each probe (``still_needed``) runs the smallest reproducer in a fresh process, with CUDA hidden
and ``transformer_engine`` made unimportable, and reports DEFECT or FIXED (see ``base.run_probe``).
What is configuration rather than a defect (the inference RNG tracker, the ``allgather`` MoE
dispatcher, the explicit causal mask) stays in ``runtime.megatron``; see ``runtime.patches``.
"""
from __future__ import annotations

import queue

import torch

from runtime.patches.base import Patch, probe_one

UPSTREAM = "megatron-core 0.16.1"

# Every probe starts like this: no CUDA (run_probe hides it), no TE, megatron imported fast.
_PRELUDE = """
import sys
sys.modules["transformer_engine"] = None  # probe the no-TE case whatever is installed
from runtime.megatron_import import import_megatron
import_megatron()
import torch
def report(name, defect, detail):
    print("PROBE", name, "DEFECT" if defect else "FIXED", detail, flush=True)
"""


def _probe(name: str, body: str, timeout: float = 120.0) -> bool:
    return probe_one(name, ["-c", _PRELUDE + f"NAME = {name!r}\n" + body], timeout)


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- torch.cuda on CPU
def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _no_synchronize(*args, **kwargs) -> None:
    return None


def cuda_current_device() -> None:
    """``torch.cuda.current_device()`` answers the CPU device."""
    if _on_cpu():
        torch.cuda.current_device = _cpu_device


def cuda_synchronize() -> None:
    """``torch.cuda.synchronize()`` does nothing (CPU work is synchronous)."""
    if _on_cpu():
        torch.cuda.synchronize = _no_synchronize


_PROBE_CURRENT_DEVICE = """
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
try:
    rope(4)
except (AssertionError, RuntimeError) as err:
    if "cuda" not in str(err).lower():
        raise
    report(NAME, True, f"RotaryEmbedding(4) on CPU raised {err!r}")
else:
    report(NAME, False, "RotaryEmbedding(4) ran on CPU")
"""

_PROBE_SYNCHRONIZE = """
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
try:
    FileSystemWriterAsync.preload_tensors([], non_blocking=True)
except (AssertionError, RuntimeError) as err:
    if "cuda" not in str(err).lower():
        raise
    report(NAME, True, f"FileSystemWriterAsync.preload_tensors on CPU raised {err!r}")
else:
    report(NAME, False, "FileSystemWriterAsync.preload_tensors ran on CPU")
"""


# --------------------------------------------------------------------------- TE flags without TE
def mla_have_te() -> None:
    """MLA's ``HAVE_TE`` reads False when Transformer Engine cannot be imported."""
    if not _on_cpu() or _te_importable():
        return
    from megatron.core.transformer import multi_latent_attention as mla

    mla.HAVE_TE = False


def moe_te_general_gemm() -> None:
    """``moe_utils.te_general_gemm`` exists (None: the router falls back to ``torch.mm``)."""
    if not _on_cpu():
        return
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


_PROBE_HAVE_TE = """
from megatron.core.transformer import multi_latent_attention as mla
report(NAME, mla.HAVE_TE is True, f"HAVE_TE={mla.HAVE_TE} TELinear={type(mla.TELinear).__name__} without TE")
"""

_PROBE_GENERAL_GEMM = """
from megatron.core.transformer.moe import moe_utils
try:
    moe_utils.router_gating_linear(torch.ones(2, 4), torch.ones(3, 4), None, torch.float32)
except NameError as err:
    if "te_general_gemm" not in str(err):
        raise
    report(NAME, True, f"router_gating_linear raised {err!r}")
else:
    report(NAME, False, "router_gating_linear ran without TE")
"""


# --------------------------------------------------------------------------- checkpoint writer
def _write_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue):
    """``write_preloaded_data_multiproc`` without the forked writers: each bucket is written
    here, by the same ``write_preloaded_data``, and an error is returned, never waited for."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results, counts = queue.Queue(), queue.Queue()  # the writer calls get() + task_done()
    collected: dict = {}
    for i, bucket in enumerate(write_buckets):
        counts.put(i)
        FileSystemWriterAsync.write_preloaded_data(
            transform_list, i, bucket, results, counts, True, use_msc=use_msc)
        idx, out = results.get()
        if isinstance(out, Exception):
            global_results_queue.put(out)
            return
        collected[idx] = out
    global_results_queue.put(collected)


def checkpoint_writer_in_process() -> None:
    """``dist_checkpointing.save`` (torch_dist) writes its buckets in the calling process."""
    if not _on_cpu():
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async.FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(_write_in_process)
    # The results queue is otherwise a multiprocessing Manager (a spawned server process).
    filesystem_async._get_write_results_queue = queue.Queue


_PROBE_WRITER = """
import os, queue, tempfile, threading
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
fa.HAVE_PSUTIL = False  # the forked writer's memory reading raises outside its try: the writer dies
bucket = (os.path.join(tempfile.mkdtemp(), "probe.distcp"), "probe", ([], []))
results = queue.Queue()
writer = threading.Thread(target=fa.FileSystemWriterAsync.write_preloaded_data_multiproc,
                          args=([], False, 0, [bucket], results), daemon=True)
writer.start()
writer.join(5.0)
if writer.is_alive():
    report(NAME, True, "write_preloaded_data_multiproc still waiting 5 s after its only writer died")
else:
    report(NAME, False, f"write_preloaded_data_multiproc returned {results.get_nowait()!r}")
os._exit(0)  # the waiting thread never ends
"""


# --------------------------------------------------------------------------- CP rope slicing
def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """Device-agnostic ``get_pos_emb_on_this_cp_rank``: the same chunks r and 2*cp-1-r (the
    load-balanced CP layout of ``runtime.cp_attention``), indexed on ``pos_emb``'s device."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp, rank = cp_group.size(), cp_group.rank()
    idx = torch.tensor([rank, 2 * cp - 1 - rank], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


def cp_rope_on_cpu() -> None:
    """Swap ``_pos_emb_on_this_cp_rank`` in wherever MCore imported the CUDA-only original."""
    if not _on_cpu():
        return
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding

    for mod in (rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding):
        mod.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank


_PROBE_CP_ROPE = """
from megatron.core.models.common.embeddings import rope_utils
class Group:  # a CP group of two, seen from rank 0
    def size(self): return 2
    def rank(self): return 0
try:
    rope_utils.get_pos_emb_on_this_cp_rank(torch.arange(8.0).view(8, 1, 1, 1), 0, Group())
except RuntimeError as err:
    if "pin" not in str(err) and "cuda" not in str(err).lower():
        raise
    report(NAME, True, f"get_pos_emb_on_this_cp_rank on CPU raised {err!r}")
else:
    report(NAME, False, "get_pos_emb_on_this_cp_rank ran on CPU")
"""


# --------------------------------------------------------------------------- MLA rope key under TP
class _SumTailGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient of the last `n` channels over `group`."""

    @staticmethod
    def forward(ctx, x, n, group):
        ctx.n, ctx.group = n, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        tail = grad[..., -ctx.n:].contiguous()
        dist.all_reduce(tail, group=ctx.group)
        grad[..., -ctx.n:] = tail
        return grad, None, None


def _kv_gather_sums_rope_grad(get_qkv):
    """``get_query_key_value_tensors`` whose gather of the column-split kv down projection hands
    every TP rank the gradient of the shared rope key summed over TP (each rank's heads add theirs)."""
    def wrapper(self, *args, **kwargs):
        from megatron.core.transformer import multi_latent_attention as mla

        kv_down, seen = self.linear_kv_down_proj, {}
        if type(kv_down).__name__ != "ColumnParallelLinear":
            return get_qkv(self, *args, **kwargs)
        hook = kv_down.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out[0]))
        gather = mla.gather_from_tensor_model_parallel_region

        def kv_aware_gather(x, group=None):
            y = gather(x, group) if group is not None else gather(x)
            if x is seen.get("out"):
                y = _SumTailGrad.apply(y, self.config.qk_pos_emb_head_dim, group or kv_down.tp_group)
            return y

        mla.gather_from_tensor_model_parallel_region = kv_aware_gather
        try:
            return get_qkv(self, *args, **kwargs)
        finally:
            mla.gather_from_tensor_model_parallel_region = gather
            hook.remove()
    return wrapper


def mla_rope_key_grad_tp() -> None:
    """Local-spec MLA at TP > 1: the rope key's gradient is summed over the TP ranks."""
    if not _on_cpu():
        return
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention
    from runtime.patches.cuda_shim import wrap

    wrap(MLASelfAttention, "get_query_key_value_tensors", _kv_gather_sums_rope_grad)


def _probe_mla_rope() -> bool:
    """Two ranks at TP=2 (torchrun): ``runtime.patches.mla_probe`` compares the backward of a local MLA
    layer with a float64 finite difference."""
    from runtime.net import free_port

    return probe_one("mla_rope_key_grad_tp", ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                                              str(free_port()), "-m", "runtime.patches.mla_probe"], timeout=240)


# --------------------------------------------------------------------------- records
_SETUP = "runtime.megatron.setup(), once per process, before any model is built (CPU only)"

PATCHES = (
    Patch("cuda_current_device", UPSTREAM,
          "megatron/core/models/common/embeddings/rotary_pos_embedding.py (RotaryEmbedding.get_emb), "
          "also transformer/attention.py, transformer/module.py, transformer/transformer_layer.py",
          "the forward pass calls torch.cuda.current_device(): 'Torch not compiled with CUDA enabled'",
          cuda_current_device, lambda: _probe("cuda_current_device", _PROBE_CURRENT_DEVICE), "process",
          _SETUP, "rotary embedding and layers take the device from their tensors or config"),
    Patch("cuda_synchronize", UPSTREAM,
          "megatron/core/dist_checkpointing/strategies/filesystem_async.py (FileSystemWriterAsync."
          "preload_tensors), also fully_parallel.py, async_utils.py",
          "dist_checkpointing.save calls torch.cuda.synchronize(): 'Torch not compiled with CUDA enabled'",
          cuda_synchronize, lambda: _probe("cuda_synchronize", _PROBE_SYNCHRONIZE), "process",
          _SETUP, "dist_checkpointing synchronises only when CUDA is in use"),
    Patch("mla_have_te", UPSTREAM,
          "megatron/core/transformer/multi_latent_attention.py (HAVE_TE)",
          "HAVE_TE is True without TE (the TE extension import succeeds, leaving MagicMock placeholders): "
          "building MLA raises 'isinstance() arg 2 must be a type' (TELinear is a MagicMock)",
          mla_have_te, lambda: _probe("mla_have_te", _PROBE_HAVE_TE), "process",
          _SETUP, "HAVE_TE is False when transformer_engine cannot be imported"),
    Patch("moe_te_general_gemm", UPSTREAM,
          "megatron/core/transformer/moe/moe_utils.py (RouterGatingLinearFunction.forward)",
          "every MoE router forward raises NameError: name 'te_general_gemm' is not defined",
          moe_te_general_gemm, lambda: _probe("moe_te_general_gemm", _PROBE_GENERAL_GEMM), "process",
          _SETUP, "moe_utils defines te_general_gemm = None when the TE import fails"),
    Patch("checkpoint_writer_in_process", UPSTREAM,
          "megatron/core/dist_checkpointing/strategies/filesystem_async.py "
          "(FileSystemWriterAsync.write_preloaded_data_multiproc)",
          "torch_dist save forks writer processes and joins a JoinableQueue: a writer that dies "
          "(no psutil, or a fork of a process holding gloo/Ray threads) hangs the save forever, no error",
          checkpoint_writer_in_process, lambda: _probe("checkpoint_writer_in_process", _PROBE_WRITER), "process",
          _SETUP, "a dead writer makes the save raise instead of hang (then weigh keeping in-process "
          "writes anyway: forking a threaded process stays risky)"),
    Patch("mla_rope_key_grad_tp", UPSTREAM,
          "megatron/core/transformer/multi_latent_attention.py (MLASelfAttention.get_query_key_value_tensors: "
          "the ColumnParallelLinear kv down projection of the local spec)",
          "local-spec MLA at TP > 1: the gathered rope key (k_pos_emb, shared by all heads) gets only this TP "
          "rank's heads' gradient (gather's backward splits, nothing sums): every gradient below it is wrong "
          "(a tiny DeepSeek-V3 at TP=2: grad norm 12.82 vs 13.05 at TP=1), SILENT",
          mla_rope_key_grad_tp, _probe_mla_rope, "process",
          _SETUP, "MLA sums the rope key's gradient over TP (as its TE path does with gather_from_sequence_parallel)"),
    Patch("cp_rope_on_cpu", UPSTREAM,
          "megatron/core/models/common/embeddings/rope_utils.py (get_pos_emb_on_this_cp_rank, also "
          "imported by rotary_pos_embedding.py and yarn_rotary_pos_embedding.py)",
          "with CP > 1 the rotary slicing builds its index with pin_memory=True and .cuda(): "
          "'pin_memory=True requires a CUDA or other accelerator backend'",
          cp_rope_on_cpu, lambda: _probe("cp_rope_on_cpu", _PROBE_CP_ROPE), "process",
          "rl.policy.build_model, when it builds a CP > 1 local-spec model (CPU only)",
          "the index is built on pos_emb's device"),
)

AT_SETUP = ("cuda_current_device", "cuda_synchronize", "mla_have_te", "moe_te_general_gemm",
            "checkpoint_writer_in_process", "mla_rope_key_grad_tp")
"""What ``runtime.megatron.setup()`` applies, in this order."""
