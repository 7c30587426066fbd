"""The trainer's configuration: frozen dataclasses, YAML files, dotted `key=value` overrides, presets.

    cfg = load_config("rl/configs/tiny.yaml", ["run.steps=8", "loss.kl_coef=0.01"])

A YAML file holds one mapping per section (`model`, `data`, `rollout`, `sampling`, `reward`,
`loss`, `optim`, `run`, `ray`, `logging`); a top-level `preset: NAME` starts from a preset function
in `PRESETS` instead of the defaults. Overrides are `section.field=value` with the value parsed as
YAML (`true`, `3`, `1e-5`, `null`, `[1, 2]`), applied together after the file (so fields that are
only valid together, such as `loss.policy_loss=gspo loss.aggregation=seq-mean-token-mean`, may come
in any order; a later override of the same key wins). Unknown sections or fields and values of the
wrong type are errors that name the key and list what is allowed. Every field is documented once, by
the string under it.
What it leaves out: validation that needs the model (e.g. heads divisible by TP): the policy
checks that when it builds. Without it, options would be scattered over argparse flags.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import yaml

from rl.advantages import ADVANTAGES
from rl.grpo import LossConfig
from rl.overlong import RewardSection
from rl.rollout.section import RolloutSection
from rl.sampling import SamplingSection


@dataclass(frozen=True)
class LoRASection:
    rank: int = 0
    """adapter rank r; 0 = no LoRA (every weight trained)"""
    alpha: float = 16.0
    """adapters add alpha / rank * B A x"""
    dropout: float = 0.0
    """dropout on the adapters' input (must be 0 with model.tp > 1)"""
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    """HF linears to adapt, by last name (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; MLA's
    q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj; "experts" for every routed expert's linears)"""
    init_from: Optional[str] = None
    """a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to start from"""


@dataclass(frozen=True)
class ModelSection:
    path: str = "runs/tiny/model"
    """hf2mcore output directory (torch_dist under release/ or iter_*/, plus hf/ with config and tokenizer);
    MTP layers in it are not trained (every published GRPO recipe turns MTP off) and not read"""
    fabricate: Optional[str] = None
    """family for tools.make_tiny when `path` is absent (e.g. "qwen2"); None: a missing path is an error"""
    fabricate_overrides: dict = field(default_factory=dict)
    """config.json fields for the fabricated model (e.g. {num_hidden_layers: 2})"""
    fabricate_warmup: dict = field(default_factory=dict)
    """supervised warm-up of the fabricated model on the training split before conversion (rl.warmup.
    WarmupConfig fields: steps, batch, lr, revise_share), so a tiny random model earns rewards; {} = none"""
    dtype: str = "fp32"
    """trainer parameter dtype: fp32 or bf16 (bf16 keeps fp32 master weights in the optimizer)"""
    spec: str = "local"
    """MCore layer spec: "local" (CPU, torch modules) or "te" (Transformer Engine, GPU)"""
    tp: int = 1
    """tensor parallel size"""
    pp: int = 1
    """pipeline parallel size: the decoder is cut into pp stages, run by Megatron-Core's 1F1B schedule"""
    vpp: Optional[int] = None
    """virtual pipeline stages per pp rank (MCore virtual_pipeline_model_parallel_size, interleaved 1F1B);
    None = one chunk per rank; needs pp >= 2 and micro-batches per step divisible by pp"""
    pp_first_layers: Optional[int] = None
    """decoder layers on the first pipeline stage (MCore num_layers_in_first_pipeline_stage), e.g. fewer
    to make room for the embedding; None = an even split"""
    pp_last_layers: Optional[int] = None
    """decoder layers on the last pipeline stage (MCore num_layers_in_last_pipeline_stage), e.g. fewer
    to make room for the output layer and the loss; None = an even split"""
    ep: int = 1
    """expert parallel size (MoE)"""
    etp: Optional[int] = None
    """expert tensor parallel size; None = tp"""
    cp: int = 1
    """context parallel size (sequence split across ranks, load-balanced chunks)"""
    dp: int = 1
    """data parallel size; trainer world size = tp * pp * cp * dp (ep and etp fold into it)"""
    moe_router_load_balancing_type: str = "none"
    """MoE load-balancing loss; "none" for RL (ChatLearn's advice for DeepSeek-V3 / Moonlight)"""
    moe_aux_loss_coeff: float = 0.0
    """weight of the MoE auxiliary loss; 0 for RL"""
    moe_router_bias_update_rate: float = 0.0
    """expert-bias update rate; 0 freezes the router's expert bias during RL"""
    packing: bool = False
    """pack each micro-batch's rows into one sequence (MCore THD, cu_seqlens) instead of right-padding
    them to the longest, so padding is not computed (train/pad_frac); needs cp = 1 (rl.packing)"""
    recompute: str = "none"
    """activation recompute: "none"; "full" (whole layers, MCore recompute_granularity=full, see
    recompute_method / recompute_num_layers); "selective" (the modules in recompute_modules)"""
    recompute_method: str = "uniform"
    """full recompute: "uniform" (every layer, in chunks of recompute_num_layers) or "block" (the first
    recompute_num_layers layers of each stage / virtual stage)"""
    recompute_num_layers: int = 1
    """full recompute: layers per checkpointed chunk (uniform) or layers recomputed per stage (block)"""
    recompute_modules: tuple = ("core_attn",)
    """selective recompute: MCore recompute_modules (core_attn, mlp, moe, moe_act, shared_experts,
    layernorm, mla_up_proj)"""
    lora: LoRASection = field(default_factory=LoRASection)
    """LoRA (rl.lora): base weights frozen, adapters trained and synced alone (rank 0: off)"""


@dataclass(frozen=True)
class DataSection:
    task: str = "synthetic"
    """"synthetic" (rl.data.synthetic arithmetic, built in the run dir) or "jsonl" (train_path/test_path)"""
    train_path: Optional[str] = None
    """rows of the rl.data schema for training (task "jsonl")"""
    test_path: Optional[str] = None
    """held-out rows for evaluation (task "jsonl")"""
    synthetic: dict = field(default_factory=lambda: {"n_train": 2000, "n_test": 200, "max_digits": 2})
    """rl.data.synthetic.ArithConfig fields (task "synthetic")"""
    prompts_per_step: int = 4
    """prompts per training step (the batch holds prompts_per_step * rollout.n responses)"""
    max_prompt_tokens: int = 256
    """prompts longer than this (after the chat template) are skipped, with a count"""
    eval_prompts: int = 32
    """held-out prompts scored at each evaluation (the first ones of the test split)"""
    shuffle: bool = True
    """reshuffle the training rows every epoch (seeded by run.seed and the epoch)"""


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-5
    """peak learning rate"""
    schedule: str = "constant"
    """after warm-up (MCore OptimizerParamScheduler lr_decay_style): "constant", "linear" or "cosine" (to
    min_lr_ratio * lr over the run's optimizer steps)"""
    warmup_steps: int = 0
    """linear warm-up over this many optimizer steps, from 0 at the first step (Megatron-LM's --lr-warmup-iters)"""
    min_lr_ratio: float = 0.0
    """final lr as a fraction of lr for the decaying schedules"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (Megatron-Core exempts biases and 1-D parameters such as norm weights)"""
    betas: tuple = (0.9, 0.999)
    """AdamW betas"""
    eps: float = 1e-8
    """AdamW epsilon"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0 disables clipping (the norm is still logged)"""
    distributed: bool = True
    """Megatron-Core's distributed optimizer: fp32 master weights and Adam moments sharded over data
    parallel (expert parameters over expert data parallel); false replicates them on every DP rank"""
    cpu_offload: bool = False
    """keep the optimizer state on the host and step it there (MCore optimizer_cpu_offload; GPU trainers
    only, needs distributed=true)"""
    offload_fraction: float = 1.0
    """with cpu_offload: the fraction of the optimizer state kept on the host"""
    overlap_grad_reduce: bool = False
    """overlap the data-parallel gradient reduce-scatter with the backward pass (MCore DDP)"""
    overlap_param_gather: bool = False
    """overlap the distributed optimizer's parameter all-gather with the next forward (needs distributed)"""


@dataclass(frozen=True)
class RunSection:
    dir: str = "runs/tiny"
    """run directory: metrics.jsonl, TensorBoard events, plot, checkpoints, Ray's files"""
    steps: int = 4
    """training steps (each: rollout, logprobs, PPO epochs, sync)"""
    ppo_epochs: int = 1
    """passes over each step's batch (optimizer steps per step = ppo_epochs * mini_batches)"""
    mini_batches: int = 1
    """optimizer steps per PPO epoch (the batch is cut into this many mini-batches)"""
    micro_batch_size: int = 8
    """sequences per forward/backward on one data-parallel rank"""
    advantage: str = "grpo"
    """advantage estimator in rl.advantages.ADVANTAGES: grpo, drgrpo"""
    reward: str = "math"
    """reward in rl.reward.REWARDS: math, math_verify"""
    log_kl: bool = True
    """compute reference log-probs to log KL even when loss.kl_coef is 0 (costs a second model)"""
    seed: int = 0
    """seeds data order, sampling and initialisation"""
    eval_every: int = 2
    """evaluate on the held-out prompts every this many steps (and before the first); 0 disables"""
    checkpoint_every: int = 2
    """save a resumable checkpoint every this many steps (and after the last); 0 disables"""
    keep_checkpoints: int = 2
    """how many recent checkpoints to keep"""
    resume: bool = False
    """continue from the newest checkpoint in dir/checkpoints"""
    export_hf: bool = True
    """write the final policy as a Hugging Face checkpoint (dir/hf) with convert.mcore2hf"""
    stop_at: Optional[int] = None
    """end the run after this step as if interrupted (tests resume; None = run all steps)"""
    max_restarts: int = 1
    """how often a dead rollout or trainer actor restarts the run from the last checkpoint"""


@dataclass(frozen=True)
class RaySection:
    enabled: bool = True
    """run trainer ranks and the rollout engine as Ray actors; false: all in this process (world 1)"""
    address: Optional[str] = None
    """existing Ray cluster ("auto", "ray://..."); None starts a local one with files in run dir"""
    mode: str = "colocated"
    """"colocated" (trainer and engine share one placement group / node) or "disaggregated"
    (separate placement groups, e.g. different GPU nodes)"""
    num_cpus: Optional[int] = None
    """CPUs of the local cluster (None = all)"""
    gpus_per_trainer: float = 0.0
    """GPUs each trainer rank asks for (0 on CPU)"""
    gpus_per_engine: float = 0.0
    """GPUs the rollout engine asks for (0 on CPU; fractional to share a GPU when colocated)"""
    threads_per_actor: int = 1
    """torch threads in each actor"""


@dataclass(frozen=True)
class LoggingSection:
    tensorboard: bool = True
    """write TensorBoard events to dir/tensorboard"""
    wandb: str = "disabled"
    """"disabled", "online" or "offline" (offline needs no network); needs the wandb package"""
    wandb_project: str = "rl"
    """wandb project name"""
    plot: bool = True
    """save dir/curves.png (reward, accuracy, response length) at the end"""


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    """the policy / reference model and its parallel layout"""
    data: DataSection = field(default_factory=DataSection)
    """prompts and held-out split"""
    rollout: RolloutSection = field(default_factory=RolloutSection)
    """sampling and the rollout engine"""
    sampling: SamplingSection = field(default_factory=SamplingSection)
    """which sampled groups a step trains on (DAPO dynamic sampling, rl.sampling.SamplingSection)"""
    reward: RewardSection = field(default_factory=RewardSection)
    """reward shaping: overlong filtering or punishment (rl.overlong.RewardSection)"""
    loss: LossConfig = field(default_factory=LossConfig)
    """GRPO loss (rl.grpo.LossConfig)"""
    optim: OptimSection = field(default_factory=OptimSection)
    """AdamW and the lr schedule"""
    run: RunSection = field(default_factory=RunSection)
    """loop length, evaluation, checkpoints"""
    ray: RaySection = field(default_factory=RaySection)
    """process layout"""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """metric sinks"""

    def __post_init__(self):
        m = self.model
        for name in ("tp", "pp", "ep", "cp", "dp"):
            if getattr(m, name) < 1:
                raise ValueError(f"model.{name}={getattr(m, name)}: parallel sizes are >= 1")
        experts = m.ep * (m.etp or m.tp) * m.pp
        if self.world_size % experts:
            raise ValueError(f"model.ep * etp * pp = {experts} must divide the trainer world tp*pp*cp*dp = "
                             f"{self.world_size}; raise model.dp or lower model.ep")
        if self.run.advantage not in ADVANTAGES:
            raise ValueError(f"run.advantage={self.run.advantage!r}: choose one of {sorted(ADVANTAGES)}")
        if self.rollout.engine not in ("vllm", "transformers"):
            raise ValueError(f"rollout.engine={self.rollout.engine!r}: choose 'vllm' or 'transformers'")
        if self.ray.mode not in ("colocated", "disaggregated"):
            raise ValueError(f"ray.mode={self.ray.mode!r}: choose 'colocated' or 'disaggregated'")
        if self.logging.wandb not in ("disabled", "online", "offline"):
            raise ValueError(f"logging.wandb={self.logging.wandb!r}: choose disabled, online or offline")
        if self.data.task not in ("synthetic", "jsonl"):
            raise ValueError(f"data.task={self.data.task!r}: choose 'synthetic' or 'jsonl'")
        if self.rollout.n < 2 and self.run.advantage == "grpo":
            raise ValueError(f"rollout.n={self.rollout.n}: GRPO needs >= 2 responses per prompt")
        if m.packing and m.cp > 1:
            raise ValueError(f"model.packing=true with model.cp={m.cp}: packed sequences are not split over "
                             "context-parallel ranks here; set model.packing=false or model.cp=1")
        self._check_rollout()
        self._check_training_stack()
        if self.reward.overlong == "shape" and self.reward.buffer(self.rollout.max_tokens) > self.rollout.max_tokens:
            raise ValueError(f"reward.overlong_buffer={self.reward.overlong_buffer} exceeds rollout.max_tokens="
                             f"{self.rollout.max_tokens}: the penalty zone lies within the length limit; lower it")

    def _check_training_stack(self) -> None:
        m, o = self.model, self.optim
        if m.recompute not in RECOMPUTE:
            raise ValueError(f"model.recompute={m.recompute!r}: choose one of {list(RECOMPUTE)}")
        if m.recompute_method not in ("uniform", "block") or m.recompute_num_layers < 1:
            raise ValueError(f"model.recompute_method={m.recompute_method!r}, recompute_num_layers="
                             f"{m.recompute_num_layers}: choose uniform or block, and at least 1 layer")
        if unknown := sorted(set(m.recompute_modules) - set(RECOMPUTE_MODULES)):
            raise ValueError(f"model.recompute_modules: {unknown} unknown; choose from {list(RECOMPUTE_MODULES)}")
        if m.vpp is not None and (m.vpp < 2 or m.pp < 2):
            raise ValueError(f"model.vpp={m.vpp} with model.pp={m.pp}: virtual stages need pp >= 2 and vpp >= 2 "
                             "(or vpp: null)")
        for name in ("pp_first_layers", "pp_last_layers"):
            n = getattr(m, name)
            if n is not None and (n < 1 or m.pp < 2):
                raise ValueError(f"model.{name}={n} with model.pp={m.pp}: an uneven first/last stage needs pp >= 2 "
                                 "and at least one layer there")
        if (o.cpu_offload or o.overlap_param_gather) and not o.distributed:
            what = "cpu_offload" if o.cpu_offload else "overlap_param_gather"
            raise ValueError(f"optim.{what}=true needs the distributed optimizer: set optim.distributed=true")
        if o.cpu_offload and self.ray.gpus_per_trainer == 0:
            raise ValueError("optim.cpu_offload=true, but ray.gpus_per_trainer=0: the trainer runs on CPU, where the "
                             "optimizer state already is in host memory; set optim.cpu_offload=false")
        lora = m.lora
        if lora.rank < 0 or (lora.rank and (lora.alpha <= 0 or not 0 <= lora.dropout < 1 or not lora.targets)):
            raise ValueError(f"model.lora: rank={lora.rank}, alpha={lora.alpha}, dropout={lora.dropout}, targets="
                             f"{list(lora.targets)}: need rank >= 0 (0 = off), alpha > 0, 0 <= dropout < 1, some targets")
        if lora.rank and lora.dropout > 0 and m.tp > 1:
            raise ValueError(f"model.lora.dropout={lora.dropout} with model.tp={m.tp}: TP ranks would drop different "
                             "features; set model.lora.dropout=0")
        if lora.init_from and not lora.rank:
            raise ValueError("model.lora.init_from is set but model.lora.rank is 0: set the adapter's rank")
        if not 0 < o.offload_fraction <= 1:
            raise ValueError(f"optim.offload_fraction={o.offload_fraction}: choose a fraction in (0, 1]")

    def _check_rollout(self) -> None:
        r = self.rollout
        if r.routing_replay and r.engine != "vllm":
            raise ValueError(f"rollout.routing_replay=true with rollout.engine={r.engine!r}: only the vLLM engine "
                             "returns the experts it routed to; set rollout.engine=vllm or routing_replay=false")
        if not r.async_generation:
            return
        if r.max_staleness < 1:
            raise ValueError(f"rollout.async_generation=true with rollout.max_staleness={r.max_staleness}: samples "
                             "generated one step ahead are one version old; set max_staleness >= 1 or async_generation=false")
        if not self.ray.enabled or self.ray.mode == "colocated":
            why = "ray.enabled=false runs engine and trainer in one process" if not self.ray.enabled else (
                "ray.mode=colocated shares the GPU: the engine sleeps while the trainer trains")
            raise ValueError(f"rollout.async_generation=true, but {why}, so generation cannot overlap training; "
                             "set ray.mode=disaggregated (ray.enabled=true) or async_generation=false")

    @property
    def world_size(self) -> int:
        m = self.model
        return m.tp * m.pp * m.cp * m.dp


RECOMPUTE = ("none", "full", "selective")
RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "moe_act", "shared_experts", "layernorm", "mla_up_proj")


# ------------------------------------------------------------------------------- presets
def tiny() -> TrainConfig:
    """CPU smoke run: a fabricated 2-layer Qwen2 (fp32), synthetic arithmetic, a few steps."""
    return TrainConfig(
        model=ModelSection(path="runs/tiny/model", fabricate="qwen2",
                           fabricate_overrides={"num_hidden_layers": 2}),
        rollout=RolloutSection(n=4, max_tokens=24, max_model_len=512),
        optim=OptimSection(lr=1e-5),
        run=RunSection(dir="runs/tiny", steps=4, micro_batch_size=8, eval_every=2, checkpoint_every=2),
        data=DataSection(prompts_per_step=4, eval_prompts=16))


def gpu_moe() -> TrainConfig:
    """A GPU cluster starting point for DeepSeek-V3 / Moonlight / Qwen3-MoE style models (bf16, TE,
    TP x EP, MoE stability knobs at their RL defaults, rollout routing replay and token-level masked IS
    against the engine mismatch, one-step-ahead generation on the engine's own GPUs)."""
    return TrainConfig(
        model=ModelSection(path="checkpoints/model-mcore", dtype="bf16", spec="te", tp=2, ep=8, etp=1, dp=8),
        data=DataSection(task="jsonl", train_path="data/math/train.jsonl", test_path="data/math/test.jsonl",
                         prompts_per_step=64, max_prompt_tokens=1024, eval_prompts=500),
        rollout=RolloutSection(n=8, max_tokens=4096, dtype="bfloat16", max_model_len=6144, kv_cache_bytes=0,
                               gpu_memory_utilization=0.6, temperature=1.0, routing_replay=True, async_generation=True),
        loss=LossConfig(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.0, correction="masked_is_token",
                        is_band_low=0.5, is_band_high=5.0),
        optim=OptimSection(lr=1e-6, warmup_steps=10, weight_decay=0.01, grad_clip=1.0),
        run=RunSection(dir="runs/moe", steps=500, micro_batch_size=1, mini_batches=4, log_kl=False,
                       eval_every=20, checkpoint_every=50),
        ray=RaySection(mode="disaggregated", gpus_per_trainer=1.0, gpus_per_engine=1.0, threads_per_actor=8))


PRESETS = {"tiny": tiny, "gpu_moe": gpu_moe, "default": TrainConfig}


# ------------------------------------------------------------------------------- loading
def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> TrainConfig:
    """The config from a YAML file (optional) and `section.field=value` overrides, in that order."""
    doc: dict = {}
    if path is not None:
        text = Path(path).read_text()
        doc = yaml.safe_load(text) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections, got {type(doc).__name__}")
    preset = doc.pop("preset", "default")
    if preset not in PRESETS:
        raise ValueError(f"{path}: preset {preset!r} unknown; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    _refuse_orphan_tis_cap(doc.get("loss"), str(path or "config"))
    cfg = merge(cfg, doc, where=str(path or "config"))
    changes: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: write section.field=value, e.g. run.steps=8")
        *parents, last = key.strip().split(".")
        node = changes
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = yaml.safe_load(value) if value.strip() else ""
    _refuse_orphan_tis_cap(changes.get("loss"), "overrides", cfg.loss.correction)
    return merge(cfg, changes, where="overrides") if changes else cfg


def _refuse_orphan_tis_cap(loss, where: str, correction: str = "none") -> None:
    """Before the correction setting, ``loss.tis_cap`` alone switched truncated IS on; now it
    does nothing without ``correction: tis``. Say so instead of silently training uncorrected."""
    if isinstance(loss, dict) and "tis_cap" in loss and loss.get("correction", correction) != "tis":
        raise ValueError(f"{where}: loss.tis_cap is set but loss.correction is "
                         f"{loss.get('correction', correction)!r}; tis_cap applies only with correction: tis "
                         "(add it, or drop tis_cap)")


def merge(obj, changes: dict, where: str):
    """A copy of dataclass `obj` with `changes` (nested dicts for nested dataclasses) applied."""
    if not isinstance(changes, dict):
        raise ValueError(f"{where}: expected a mapping for {type(obj).__name__}, got {changes!r}")
    known = {f.name: f for f in fields(obj)}
    updates = {}
    hints = typing.get_type_hints(type(obj))
    for key, value in changes.items():
        if key not in known:
            raise ValueError(f"{where}: {type(obj).__name__} has no field {key!r}; known: {sorted(known)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            updates[key] = merge(current, value, f"{where} -> {key}")
        else:
            updates[key] = _coerce(value, hints[key], f"{where}: {type(obj).__name__}.{key}")
    return replace(obj, **updates)


def _coerce(value, hint, where: str):
    """Check `value` against the field's type; ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where) if len(inner) == 1 else value
    base = origin or hint
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if base is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if base in (int, str, bool, dict) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{where}: expected {getattr(base, '__name__', base)}, got {value!r}")


def to_dict(cfg) -> dict:
    """Plain nested dict (for logging the resolved config next to the metrics)."""
    return dataclasses.asdict(cfg)


def describe() -> str:
    """Every section and field with its default and docstring (for --help)."""
    import ast
    import inspect

    lines = []
    for f in fields(TrainConfig):
        cls = type(getattr(TrainConfig(), f.name))
        docs = _field_docs(cls, ast, inspect)
        lines.append(f"{f.name}:")
        for sub in fields(cls):
            default = getattr(getattr(TrainConfig(), f.name), sub.name)
            lines.append(f"  {f.name}.{sub.name}={default!r}  {docs.get(sub.name, '')}")
    return "\n".join(lines)


def _field_docs(cls, ast, inspect) -> dict:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    out = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            out[a.target.id] = " ".join(str(b.value.value).split())
    return out
