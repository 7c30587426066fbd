"""The upstream patches (``runtime.patches``): each is still needed by the installed Megatron-Core /
vLLM (its probe reproduces the defect without the patch; the test fails, naming the patch to
delete, once upstream fixes it), each record says what it patches, and applying twice is harmless.

Megatron-Core probes run a reproducer in a fresh process (~2 s each; the writer's ~7 s, since it
waits for a hang). The vLLM rope probe calls the CPU kernel without an engine (~6 s); the reload
probes share one engine on a tiny DeepSeek-V3 (~15 s, marked ``vllm``)."""
import json
import re
from importlib.metadata import version

import pytest
import torch

from runtime import patches
from runtime.patches import megatron_core, megatron_train, vllm
from runtime.patches.base import run_probe
from runtime.patches.base import SCOPES


def _gone(p) -> str:
    pkg, _, ver = p.upstream.partition(" ")
    return (f"upstream {pkg} {version(pkg)} fixed this (patched for {ver}; {p.remove_when}): delete patch "
            f"{p.name!r} from runtime/patches and where it is applied: {p.applied_by}")


@pytest.mark.parametrize("name", [p.name for p in megatron_core.PATCHES])
def test_megatron_core_patch_still_needed(name):
    p = patches.get(name)
    assert p.still_needed(), _gone(p)


@pytest.mark.parametrize("name", megatron_train.AT_TRAIN)
def test_training_stack_patch_still_needed(name):
    p = patches.get(name)
    assert p.still_needed(), _gone(p)


def test_training_stack_patches_repair_what_their_probe_reproduces():
    """The same probe script, with AT_TRAIN applied first, finds every defect gone."""
    body = megatron_train._PROBE_ALL.replace(
        "rt.init_distributed()", "rt.init_distributed()\nfrom runtime import patches\npatches.apply(mt.AT_TRAIN)", 1)
    found = run_probe(["-c", megatron_core._PRELUDE + body], timeout=180)
    assert set(found) == set(megatron_train.AT_TRAIN)
    assert not any(defect for defect, _ in found.values()), {k: v for k, v in found.items() if v[0]}


@pytest.mark.multiproc
def test_mla_rope_key_grad_patch_repairs_the_tp_backward(monkeypatch):
    """With the patch, local MLA's backward at TP=2 equals a float64 finite difference."""
    monkeypatch.setenv("PROBE_PATCHED", "1")
    assert not patches.get("mla_rope_key_grad_tp").still_needed()


def test_vllm_rope_patch_still_needed_and_repairs():
    p = patches.get("cpu_rope_3d")
    assert p.still_needed(), _gone(p)
    detail = json.loads(vllm.rope_probe()["cpu_rope_3d"][1])
    assert detail["repaired"], f"cpu_rope_3d no longer repairs the 3-D rope: {detail}"
    assert detail["touched"] == [1, 0], "a second application must find nothing left to patch"


@pytest.mark.vllm
@pytest.mark.parametrize("name", [n for n in vllm.RELOAD if n != "cpu_tied_head"])
def test_vllm_reload_patch_still_needed_and_repairs(name):
    p = patches.get(name)
    assert p.still_needed(), _gone(p)
    detail = json.loads(vllm.engine_probe()[name][1])
    assert detail["repaired"], f"{name} no longer makes the reload reproduce the loaded model: {detail}"
    assert not any(detail["touched_again"].values()), "a second application must find nothing left to patch"


@pytest.mark.vllm
def test_vllm_tied_head_patch_still_needed_and_repairs():
    p = patches.get("cpu_tied_head")
    assert p.still_needed(), _gone(p)
    detail = json.loads(vllm.tied_probe()["cpu_tied_head"][1])
    assert detail["repaired"], f"cpu_tied_head no longer makes a tied head follow the reloaded embedding: {detail}"


def test_every_record_names_a_version_a_file_and_a_symptom():
    doc = patches.__doc__
    assert set(patches.PATCHES) == {p.name for p in (*megatron_core.PATCHES, *megatron_train.PATCHES, *vllm.PATCHES)}
    for p in patches.PATCHES.values():
        pkg, _, ver = p.upstream.partition(" ")
        assert re.fullmatch(r"\d+\.\d+\.\d+", ver), f"{p.name}: upstream {p.upstream!r} names no version"
        assert version(pkg) == ver, (f"{p.name} was verified against {p.upstream}, {version(pkg)} is "
                                     "installed: run tests/test_patches.py and update the record")
        assert re.search(r"\w+/\S+\.py", p.where), f"{p.name}: 'where' names no upstream file: {p.where!r}"
        assert len(p.symptom) > 20 and len(p.remove_when) > 10 and p.applied_by, p.name
        assert callable(p.apply) and callable(p.still_needed) and p.scope in SCOPES, p.name
        assert re.search(rf"^{p.name} ", doc, re.M) and p.upstream in doc, f"{p.name} missing from the table"
    assert set(megatron_core.AT_SETUP) < set(patches.PATCHES)
    assert {p.scope for p in vllm.PATCHES} == {"vllm-model", "vllm-reload"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Megatron-Core patches are CPU-only no-ops with CUDA")
def test_applying_patches_twice_is_harmless():
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.moe import moe_utils

    from runtime.megatron import setup

    def state():
        return (torch.cuda.current_device, torch.cuda.synchronize, mla.HAVE_TE, moe_utils.te_general_gemm,
                filesystem_async.FileSystemWriterAsync.write_preloaded_data_multiproc,
                filesystem_async._get_write_results_queue, rope_utils.get_pos_emb_on_this_cp_rank,
                rotary_pos_embedding.get_pos_emb_on_this_cp_rank)

    setup()
    assert patches.apply() == {p.name: None for p in (*megatron_core.PATCHES, *megatron_train.PATCHES)}
    first = state()
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    wrapped = {k: DistributedOptimizer.__dict__[k] for k in ("__init__", "load_state_dict", "sharded_state_dict")}
    patches.apply()
    for p in (*megatron_core.PATCHES, *megatron_train.PATCHES):  # the functions themselves, past the guard
        p.apply()
    assert state() == first
    assert {k: DistributedOptimizer.__dict__[k] for k in wrapped} == wrapped  # wrapped once, not twice
    assert torch.cuda.current_device() == torch.device("cpu") and mla.HAVE_TE is False
    assert moe_utils.te_general_gemm is None


def test_cp_rope_replacement_takes_this_ranks_chunks():
    """The device-agnostic ``get_pos_emb_on_this_cp_rank``: CP rank r gets chunks r and 2cp-1-r."""
    from runtime.cp_attention import cp_split

    class Group:
        def __init__(self, rank):
            self._rank = rank

        def size(self):
            return 2

        def rank(self):
            return self._rank

    emb_S111 = torch.arange(8.0).view(8, 1, 1, 1)
    for rank in (0, 1):
        got = megatron_core._pos_emb_on_this_cp_rank(emb_S111, 0, Group(rank))
        assert torch.equal(got, cp_split(emb_S111, rank, 2, dim=0))
    assert megatron_core._pos_emb_on_this_cp_rank(emb_S111, 0, Group(0)).flatten().tolist() == [0, 1, 6, 7]


def test_vllm_patch_needs_a_model_and_megatron_patch_refuses_one():
    with pytest.raises(TypeError, match="target=model"):
        patches.apply(["cpu_moe_prepack"])
    with pytest.raises(TypeError, match="without target"):
        patches.apply(["mla_have_te"], target=torch.nn.Linear(1, 1))
    with pytest.raises(KeyError, match="known: cuda_current_device"):
        patches.apply(["no_such_patch"])


def test_cuda_shim_runs_cuda_spellings_on_cpu_inside_the_call_only():
    from runtime.patches.cuda_shim import on_cpu, wrap

    def upstream(x):
        made = torch.zeros(2, device="cuda")
        return made.device.type, x.cuda() is x, x.type(), on_cpu(lambda: x.type())()

    assert on_cpu(upstream)(torch.ones(1)) == ("cpu", True, "torch.cuda.FloatTensor", "torch.cuda.FloatTensor")
    assert torch.ones(1).type() == "torch.FloatTensor"  # outside the call nothing changed

    class Owner:
        @staticmethod
        def f():
            return torch.ones(1, dtype=torch.bfloat16).type()

    wrap(Owner, "f")
    first = Owner.__dict__["f"]
    wrap(Owner, "f")
    assert Owner.f() == "torch.cuda.BFloat16Tensor" and Owner.__dict__["f"] is first
    assert isinstance(first, staticmethod)
