"""python -m rl.plan, held to what it can be held to on this machine:

* parameter counts: every pipeline stage of the recipes' layouts against the GPTModel Megatron-Core builds on
  the meta device for that rank (its TP/EP/PP sizes faked into the parallel state, see ``fake_layout``), for
  DeepSeek-V3, Qwen3-235B-A22B and Moonlight-16B from their published config.json, and every family's tiny
  preset at TP2 x EP2 x PP2; totals against the parameter counts the model cards publish;
* layer placement: against Megatron-Core's own ``get_transformer_layer_offset`` / ``get_num_layers_to_build``;
* memory: the planned trainer memory of a tiny MoE against the RSS growth of a real Megatron-Core DDP +
  distributed-optimizer run on CPU (``tests/workers/plan_rss.py``), within 25%;
* the recipes and the published layouts (verl's and NeMo-RL's DeepSeek-V3) plan as fitting on their clusters,
  NeMo-RL's on 64 GPUs does not; bad input is one line and exit 2.
"""
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mapping.registry import family_for
from rl.config import load_config
from rl.plan import params as P
from rl.plan.__main__ import main
from rl.plan.assume import Cluster, Speed
from rl.plan.core import make_plan
from rl.plan.layout import stage_layers
from runtime import megatron as rt
from tools.make_tiny import cached_tiny

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "tests/fixtures/published"
CONFIGS = ROOT / "rl/configs"
DSV3 = ["--model-config", str(PUBLISHED / "DeepSeek-V3/config.json")]


class FakeGroup:
    """A process group of a size and a rank, for building one rank's model in a world of one."""
    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@contextlib.contextmanager
def fake_layout(tp: int, pp: int, ep: int, etp: int, pp_rank: int):
    """Megatron-Core's parallel state (the module functions and the process-group collection its modules
    read sizes from) answering as TP rank 0 / EP rank 0 of pipeline stage ``pp_rank`` of this layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    rt.init_local()
    g = dict(tp=FakeGroup(tp), pp=FakeGroup(pp, pp_rank), ep=FakeGroup(ep), expt_tp=FakeGroup(etp),
             tp_ep=FakeGroup(ep * etp), cp=FakeGroup(1), tp_cp=FakeGroup(tp), mp=FakeGroup(tp * pp),
             tp_dp_cp=FakeGroup(tp), dp=FakeGroup(1), dp_cp=FakeGroup(1), expt_dp=FakeGroup(1),
             tp_ep_pp=FakeGroup(ep * etp * pp), intra_dp_cp=FakeGroup(1), intra_expt_dp=FakeGroup(1),
             embd=None, pos_embd=None, hcp=None, inter_dist_opt=None)
    getters = dict(get_tensor_model_parallel_group="tp", get_pipeline_model_parallel_group="pp",
                   get_expert_model_parallel_group="ep", get_expert_tensor_parallel_group="expt_tp",
                   get_context_parallel_group="cp", get_expert_tensor_and_model_parallel_group="tp_ep")
    saved = {name: getattr(ps, name) for name in getters}
    collection = ProcessGroupCollection.__dict__["use_mpu_process_groups"]

    def fake_collection(cls, required_pgs=None):
        pgc = ProcessGroupCollection()
        for k, v in g.items():
            setattr(pgc, k, v)
        return pgc

    try:
        for name, key in getters.items():
            setattr(ps, name, lambda *a, _key=key, **kw: g[_key])
        ProcessGroupCollection.use_mpu_process_groups = classmethod(fake_collection)
        for what, size, rank in (("tensor_model_parallel", tp, 0), ("pipeline_model_parallel", pp, pp_rank),
                                 ("expert_model_parallel", ep, 0), ("expert_tensor_parallel", etp, 0)):
            getattr(ps, f"set_{what}_world_size")(size)
            getattr(ps, f"set_{what}_rank")(rank)
        yield
    finally:
        for name, fn in saved.items():
            setattr(ps, name, fn)
        ProcessGroupCollection.use_mpu_process_groups = collection
        for what in ("tensor_model_parallel", "pipeline_model_parallel", "expert_model_parallel",
                     "expert_tensor_parallel"):
            getattr(ps, f"set_{what}_world_size")(None)
            getattr(ps, f"set_{what}_rank")(None)


def without_mtp(m):
    return dataclasses.replace(m, transformer={**m.transformer, "mtp_num_layers": None})


def meta_counts(m, tp, pp, ep, etp, pp_rank, **uneven) -> tuple[int, int]:
    """(all, routed-expert) parameters of MCore's meta model for one rank of stage ``pp_rank``."""
    with fake_layout(tp, pp, ep, etp, pp_rank):
        model = rt.build_from(m, meta=True, tp=tp, pp=pp, ep=ep, etp=etp, **uneven)
    counts = [(n, p.numel()) for n, p in model.named_parameters()]
    return sum(c for _, c in counts), sum(c for n, c in counts if ".experts." in n)


def plan_counts(config: Path, m, stage: int, *overrides) -> tuple[int, int]:
    from rl.plan.layout import layout

    cfg = load_config(config, ["model.spec=local", *overrides])
    counts = P.rank_params(m, layout(cfg.model, m), "local", stage)
    return sum(counts.values()), counts[P.EXPERT]


RECIPES = [("deepseek_v3_671b", "DeepSeek-V3"), ("qwen3_235b_a22b", "Qwen3-235B-A22B"),
           ("moonlight_16b", "Moonlight-16B-A3B")]


@pytest.mark.parametrize("recipe,published", RECIPES)
def test_recipe_stages_have_megatron_cores_parameter_counts(recipe, published):
    """Each pipeline stage of the recipe's layout: the plan's counts (all, and routed experts: what the
    distributed optimizer shards over expert-DP) equal those of MCore's meta model of that rank."""
    hf = json.loads((PUBLISHED / published / "config.json").read_text())
    m = without_mtp(family_for(hf).read_config(hf))
    s = load_config(CONFIGS / f"{recipe}.yaml").model
    uneven = {k: v for k, v in (("num_layers_in_first_pipeline_stage", s.pp_first_layers),
                                ("num_layers_in_last_pipeline_stage", s.pp_last_layers)) if v is not None}
    for stage in range(s.pp):
        want = meta_counts(m, s.tp, s.pp, s.ep, s.etp or s.tp, stage, **uneven)
        assert plan_counts(CONFIGS / f"{recipe}.yaml", m, stage) == want, (recipe, stage)


@pytest.mark.parametrize("published,billions", [("DeepSeek-V3", 671), ("Qwen3-235B-A22B", 235),
                                                 ("Qwen3-30B-A3B", 31), ("Moonlight-16B-A3B", 16)])
def test_totals_are_the_model_cards(published, billions):
    """Model cards: DeepSeek-V3 671B without its 14B MTP module, Qwen3 235B / 30.5B, Moonlight 16B."""
    hf = json.loads((PUBLISHED / published / "config.json").read_text())
    total, _ = P.model_params(without_mtp(family_for(hf).read_config(hf)))
    assert round(total / 1e9) == billions


FAMILIES = ["qwen2", "qwen3", "llama", "mistral", "mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "moonlight",
            "deepseek_v2", "glm4_moe", "gpt_oss"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_familys_ranks_have_megatron_cores_counts(family):
    """Tiny presets at TP2 x PP2 (x EP2 for MoE): biases, q/k norms, sinks, shared-expert gates, tied
    embeddings, MLA with and without q-LoRA, each stage."""
    cfg = json.loads((cached_tiny(family) / "config.json").read_text())
    m = without_mtp(family_for(cfg).read_config(cfg))
    ep = 2 if m.num_experts else 1
    for stage in range(2):
        want = meta_counts(m, 2, 2, ep, 1, stage)
        got = plan_counts(ROOT / "rl/configs/tiny.yaml", m, stage, "model.tp=2", "model.pp=2", f"model.ep={ep}",
                          "model.etp=1", "model.dp=2")
        assert got == want, (family, stage)


@pytest.mark.parametrize("layers,pp,first,last,vpp", [
    (61, 16, 3, 2, None), (61, 12, None, 6, None), (94, 8, 11, 11, None), (48, 4, None, None, None),
    (16, 4, None, None, 2), (24, 4, 4, 8, 2), (14, 3, 6, None, 2), (8, 2, None, None, 4)])
def test_layer_placement_is_megatron_cores(layers, pp, first, last, vpp):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=1, pipeline_model_parallel_size=pp,
                               virtual_pipeline_model_parallel_size=vpp, num_layers_in_first_pipeline_stage=first,
                               num_layers_in_last_pipeline_stage=last, pipeline_dtype=torch.float32)
    for r, got in enumerate(stage_layers(layers, pp, first, last, vpp)):
        want = []
        for v in range(vpp or 1):
            vp = v if vpp else None
            start = get_transformer_layer_offset(config, vp, r)
            want += range(start, start + get_num_layers_to_build(config, vp, r))
        assert list(got) == want, (r, got, want)


@pytest.mark.parametrize("layers,pp,first,last,vpp", [(12, 3, 6, None, 2), (61, 16, None, None, None),
                                                      (10, 4, 3, 2, None), (16, 4, None, None, 3)])
def test_layouts_megatron_core_refuses_are_refused(layers, pp, first, last, vpp):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from rl.plan.layout import PlanError

    with pytest.raises((ValueError, AssertionError)):
        config = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=1,
                                   pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                                   num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
                                   pipeline_dtype=torch.float32)
        for r in range(pp):
            get_num_layers_to_build(config, 0 if vpp else None, r)
    with pytest.raises(PlanError):
        stage_layers(layers, pp, first, last, vpp)


def plan(config, *args, capsys) -> tuple[int, str, str]:
    code = main(["--config", str(config), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("recipe,flags", [
    ("deepseek_v3_671b", ["--gpus", "128", "--rollout-tp", "32", *DSV3]),
    ("qwen3_235b_a22b", ["--gpus", "128", "--rollout-tp", "8", "--model-config",
                         str(PUBLISHED / "Qwen3-235B-A22B/config.json")]),
    ("qwen3_30b_a3b", ["--gpus", "24", "--rollout-tp", "2", "--model-config",
                       str(PUBLISHED / "Qwen3-30B-A3B/config.json")]),
    ("moonlight_16b", ["--gpus", "24", "--model-config", str(PUBLISHED / "Moonlight-16B-A3B/config.json")])])
def test_recipes_fit_the_cluster_in_their_header(recipe, flags, capsys):
    header = (CONFIGS / f"{recipe}.yaml").read_text().split("\npreset")[0]
    assert " ".join(flags[:-1]).replace(str(ROOT) + "/", "") in " ".join(header.replace("\\\n#", "").split())
    code, out, _ = plan(CONFIGS / f"{recipe}.yaml", *flags, capsys=capsys)
    assert code == 0 and out.splitlines()[-1].startswith("fits: "), out


VERL = ["ray.mode=colocated", "rollout.async_generation=false", "rollout.gpu_memory_utilization=0.6",
        "data.max_prompt_tokens=2048", "rollout.max_tokens=9632", "rollout.max_model_len=11680",
        "data.prompts_per_step=96", "run.mini_batches=3", "loss.kl_coef=0.001"]
NEMO_RL = ["model.tp=1", "model.pp=16", "model.ep=16", "model.pp_first_layers=3", "model.pp_last_layers=2",
           "optim.cpu_offload=false", "ray.mode=colocated", "rollout.async_generation=false",
           "rollout.gpu_memory_utilization=0.6", "data.max_prompt_tokens=512", "rollout.max_tokens=1024",
           "rollout.max_model_len=1536", "data.prompts_per_step=32", "rollout.n=16", "run.mini_batches=1",
           "loss.kl_coef=0.01"]
COLOCATED_REFIT = ["--rollout-tp", "32", "--offload-during-rollout"]


def test_verls_deepseek_v3_layout_fits_96_h20s(capsys):
    """verl's run_deepseek671b_math_megatron_96gb.sh: TP8 PP12 EP8, last stage 6 layers, full recompute,
    optimizer offload 1.0, params and grads offloaded while vLLM (TP32, 0.6 of the GPU) generates, whose
    weights are dropped in its sleep; 2048 + 9632 tokens, 96 x 8 samples in 3 mini-batches, a KL reference."""
    code, out, _ = plan(CONFIGS / "deepseek_v3_671b.yaml", *VERL, "--gpus", "96", "--gpu-gb", "96",
                        *COLOCATED_REFIT, "--sleep-level", "2", *DSV3, capsys=capsys)
    assert code == 0, out
    assert "1 of it on the host" in out
    # the trainer as it is (weights, grads and the sleeping engine's weights kept): not on 96 GB GPUs
    code, out, _ = plan(CONFIGS / "deepseek_v3_671b.yaml", *VERL, "--gpus", "96", "--gpu-gb", "96", "--rollout-tp",
                        "32", *DSV3, capsys=capsys)
    assert code == 1 and "try --offload-during-rollout and --sleep-level 2" in out.splitlines()[-1], out


def test_nemo_rls_deepseek_v3_layout_fits_256_h100s_and_not_64(capsys):
    """NeMo-RL's grpo-deepseek-v3-32n8g: TP1 PP16 EP16, first/last stage 3/2 layers, full recompute, the
    distributed optimizer on the GPU, vLLM TP32 colocated, 1536 tokens, 32 x 16 samples."""
    code, out, _ = plan(CONFIGS / "deepseek_v3_671b.yaml", *NEMO_RL, "--gpus", "256", *COLOCATED_REFIT, *DSV3,
                        capsys=capsys)
    assert code == 0, out
    code, out, err = plan(CONFIGS / "deepseek_v3_671b.yaml", *NEMO_RL, "--gpus", "64", *COLOCATED_REFIT, *DSV3,
                          capsys=capsys)
    assert code == 2 and "model.ep" in err and len(err.strip().splitlines()) == 1, err
    code, out, _ = plan(CONFIGS / "deepseek_v3_671b.yaml", *NEMO_RL, "model.ep=4", "--gpus", "64",
                        *COLOCATED_REFIT, *DSV3, capsys=capsys)
    assert code == 1 and out.splitlines()[-1].startswith("does not fit: stage "), out


def test_a_tight_layout_gets_changes_that_replan_as_fitting(capsys):
    code, out, _ = plan(CONFIGS / "deepseek_v3_671b.yaml", "optim.cpu_offload=false", "--gpus", "128",
                        "--rollout-tp", "32", *DSV3, capsys=capsys)
    last = out.splitlines()[-1]
    assert code == 1 and "needs" in last and "try optim.cpu_offload=true" in last, last


@pytest.mark.parametrize("overrides,message", [
    (["model.nonsense=1"], "ModelSection has no field 'nonsense'"),
    (["model.pp=7", "model.pp_last_layers=null"], "model.pp=7 does not divide the model's 61 decoder layers"),
    (["model.pp_last_layers=7"], "do not split evenly over the 11 middle stages"),
    (["model.ep=3", "model.dp=3"], "model.ep=3 does not divide the model's 256 routed experts"),
    (["model.tp=3", "model.ep=1"], "model.tp=3 does not divide the model's 128 attention heads")])
def test_bad_input_is_one_line_and_exit_2(overrides, message, capsys):
    code, _, err = plan(CONFIGS / "deepseek_v3_671b.yaml", *overrides, *DSV3, capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_the_command_answers_in_seconds_with_json_and_no_traceback():
    cmd = [sys.executable, "-m", "rl.plan", "--config", str(CONFIGS / "deepseek_v3_671b.yaml"), "--gpus", "128",
           "--rollout-tp", "32", "--json", *DSV3]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["fits"] and round(doc["model"]["params"] / 1e9) == 671
    assert len(doc["stages"]) == 12 and doc["engine"]["tp"] == 32
    bad = subprocess.run(cmd + ["model.pp=7"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def rss_config(tmp_path) -> Path:
    """A tiny Qwen3-MoE big enough for a few hundred MB of trainer memory (9.2M parameters)."""
    cfg = json.loads((cached_tiny("qwen3_moe") / "config.json").read_text())
    cfg.update(hidden_size=256, num_hidden_layers=4, num_experts=8, num_local_experts=8, moe_intermediate_size=256,
               vocab_size=4096, intermediate_size=512)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


RSS_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _clean_env() -> dict:
    """A fresh environment for the measured child, so that the measurement depends on the allocator settings
    below and on nothing a test session left in os.environ."""
    keep = ("PATH", "HOME", "TMPDIR", "TINY_CACHE", "LANG")
    return {k: os.environ[k] for k in keep if k in os.environ}


def measured_runs(config: Path, launcher: list, *extra: str) -> list[dict]:
    """Each rank's JSON line from tests/workers/plan_rss.py: fp32 (the CPU trainer's dtype), micro-batch
    4 x 256 tokens, the distributed optimizer, two steps (unless ``extra`` says otherwise)."""
    r = subprocess.run([*launcher, str(ROOT / "tests/workers/plan_rss.py"), "--config", str(config), "--dtype",
                        "fp32", "--micro-batch", "4", "--seq", "256", *extra], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**_clean_env(), **RSS_ENV, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]


def planned_trainer(config: Path, dp: int, *extra: str):
    """The plan of one rank for the same run: weights + grads + optimizer + activations + logits (no reserve,
    no sync buffers), and the plan."""
    p = make_plan(None, ["model.dtype=fp32", *extra, "model.spec=local", "run.micro_batch_size=4", f"model.dp={dp}",
                         "data.max_prompt_tokens=128", "rollout.max_tokens=128", "rollout.max_model_len=256",
                         "data.prompts_per_step=1", f"rollout.n={4 * dp}", "rollout.bucket_bytes=0", "run.log_kl=false"],
                  json.loads(config.read_text()), Cluster(reserve_gb=0.0), Speed())
    return p.stages[0].train * 1e9, p


def test_planned_trainer_memory_is_a_real_runs_rss_growth_within_25_percent(tmp_path):
    config = rss_config(tmp_path)
    run, = measured_runs(config, [sys.executable])
    planned, p = planned_trainer(config, dp=1)
    measured = run["peak"] - run["before"]
    assert run["params"] == p.model["params"]
    print(f"planned {planned / 1e6:.1f} MB, measured peak RSS growth {measured / 1e6:.1f} MB")
    assert measured > 100e6 and abs(planned - measured) <= 0.25 * measured, (planned, measured, run)
    assert_adam_state(run, p)


def assert_adam_state(run: dict, p) -> None:
    """The optimizer state the rank's optimizer holds (Adam's moments of its shard) is the planned one."""
    assert run["optimizer_state"] == pytest.approx(p.stages[0].optimizer * 1e9, rel=1e-3), run


@pytest.mark.multiproc
def test_the_distributed_optimizer_shards_as_planned_at_dp2(tmp_path):
    """Two torchrun ranks (gloo): each holds the Adam state of half the parameters, as planned; each rank's RSS
    growth within 25% of the plan."""
    config = rss_config(tmp_path)
    runs = measured_runs(config, [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2"])
    planned, p = planned_trainer(config, dp=2)
    assert len(runs) == 2
    for run in runs:
        measured = run["peak"] - run["before"]
        print(f"dp=2 rank: planned {planned / 1e6:.1f} MB, measured peak RSS growth {measured / 1e6:.1f} MB")
        assert abs(planned - measured) <= 0.25 * measured, (planned, measured, run)
        assert_adam_state(run, p)


def test_bf16_with_the_replicated_optimizer_holds_the_planned_18_bytes(tmp_path):
    """bf16 parameters, optim.distributed=false: Megatron-LM's 18 bytes, of which 12 (the fp32 master copy and
    Adam's moments) are the optimizer's: the state the optimizer holds is exactly the planned one."""
    config = rss_config(tmp_path)
    run, = measured_runs(config, [sys.executable], "--dtype", "bf16", "--replicated", "--steps", "1")
    _, p = planned_trainer(config, 1, "model.dtype=bf16", "optim.distributed=false")
    assert p.stages[0].optimizer * 1e9 == 12 * p.model["params"]
    assert_adam_state(run, p)
