"""Who runs where: trainer ranks and the rollout engine, as Ray actors or in this process.

    cluster = Cluster(cfg, model_dir, engine_dir)      # starts Ray (files in RUN/ray) or runs locally
    out = cluster.trainers("logprobs", batch)          # every trainer rank; rank 0's answer
    samples = cluster.engine.generate(prompts, sampling)
    cluster.shutdown()

Trainer ranks (`TrainerWorker`) form one torch.distributed group (gloo on CPU, NCCL on GPU) at the
configured TP/PP/EP/CP x DP layout and each hold a `Policy` shard, the optional frozen reference, and
a `rl.sync.weight_sync.WeightSync`. Rank 0 talks to the engine; the weight sync gathers the other ranks'
shards to it over torch.distributed and hands HF-named buckets to the engine, then tells it which policy
version it now holds (samples carry it: rl.pipeline bounds their staleness). With rollout.routing_replay
the engine returns routed experts and the policy (and reference) replay them (rl.routing).
The rollout engine (`RolloutWorker`) wraps `rl.rollout.VLLMEngine` or `rl.rollout.hf_engine.TransformersEngine`;
seen from rank 0 and from the driver it is a `RolloutEngine` (`RemoteEngine` forwards calls to the actor).

Ray layouts (`ray.mode`):
  - colocated: one placement group packed on one node; the engine shares bundle 0 with trainer
    rank 0 (fractional GPUs `ray.gpus_per_trainer` + `ray.gpus_per_engine`: GPU sharing with vLLM's sleep/wake);
  - disaggregated: the trainer's bundles and the engine's bundle in separate placement groups,
    which Ray may place on different nodes.
A local Ray cluster keeps its files in RUN/ray (`_temp_dir`) and runs with RAY_AUTH_MODE=disabled.
Without Ray (`ray.enabled=false`) the world is one process: the vLLM engine is built before the
trainer's process group and releases vLLM's own (see rl.rollout.vllm_engine).
Leaves out: several engine replicas, elastic worlds. Without it the loop would hard-code one layout.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch

from rl.rollout.base import RolloutEngine
from runtime.net import free_port

REPO = Path(__file__).resolve().parents[1]


def engine_dtype(cfg, hf_config: dict) -> torch.dtype:
    name = cfg.rollout.dtype
    if name == "auto":
        name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    return getattr(torch, name)


def make_engine(cfg, hf_dir: Path, release_process_group: bool = False) -> RolloutEngine:
    r = cfg.rollout
    if r.engine == "transformers":
        from rl.rollout.hf_engine import TransformersEngine

        return TransformersEngine(hf_dir, dtype=getattr(torch, r.dtype), seed=cfg.run.seed)
    from rl.rollout import VLLMConfig, VLLMEngine

    return VLLMEngine(VLLMConfig(
        model=str(hf_dir), dtype=r.dtype, max_model_len=r.max_model_len, kv_cache_bytes=r.kv_cache_bytes or None,
        gpu_memory_utilization=r.gpu_memory_utilization, seed=cfg.run.seed,
        enable_prefix_caching=r.prefix_caching, enable_sleep_mode=cfg.ray.mode == "colocated",
        release_process_group=release_process_group, return_routed_experts=r.routing_replay,
        max_lora_rank=cfg.model.lora.rank))


class RolloutWorker:
    """The engine behind an actor boundary (explicit methods: Ray forwards only real ones)."""

    def __init__(self, cfg, hf_dir: str):
        torch.set_num_threads(max(1, cfg.ray.threads_per_actor))
        self.engine = make_engine(cfg, Path(hf_dir))

    def dtype(self):
        return self.engine.dtype

    def generate(self, prompts, sampling):
        return self.engine.generate(prompts, sampling)

    def prompt_logprobs(self, sequences):
        return self.engine.prompt_logprobs(sequences)

    def begin_weight_update(self, expected=None):
        return self.engine.begin_weight_update(expected)

    def load_weights(self, bucket):
        return self.engine.load_weights(bucket)

    def finish_weight_update(self):
        return self.engine.finish_weight_update()

    def abort_weight_update(self):
        return getattr(self.engine, "abort_weight_update", lambda: None)()

    def set_weight_version(self, version):
        return self.engine.set_weight_version(version)

    def set_lora(self, tensors, config, version):
        return self.engine.set_lora(tensors, config, version)

    def sleep(self):
        return self.engine.sleep()

    def wake(self):
        return self.engine.wake()

    def pid(self) -> int:
        return os.getpid()


class RemoteEngine(RolloutEngine):
    """A `RolloutEngine` whose calls run in a `RolloutWorker` actor."""

    def __init__(self, handle):
        import ray

        self._ray, self.handle = ray, handle
        self.dtype = ray.get(handle.dtype.remote())

    def _call(self, name, *args):
        return self._ray.get(getattr(self.handle, name).remote(*args))

    def generate(self, prompts, sampling):
        return self._call("generate", prompts, sampling)

    def prompt_logprobs(self, sequences):
        return self._call("prompt_logprobs", sequences)

    def begin_weight_update(self, expected=None):
        return self._call("begin_weight_update", expected)

    def load_weights(self, bucket):
        return self._call("load_weights", list(bucket))

    def finish_weight_update(self):
        return self._call("finish_weight_update")

    def abort_weight_update(self):
        return self._call("abort_weight_update")

    def set_weight_version(self, version):
        self.weight_version = int(version)
        return self._call("set_weight_version", version)

    def set_lora(self, tensors, config, version):
        self.weight_version = int(version)
        return self._call("set_lora", tensors, config, version)

    def sleep(self):
        return self._call("sleep")

    def wake(self):
        return self._call("wake")


class TrainerWorker:
    """One trainer rank. `setup` is collective (all ranks call it together), as are the others."""

    def __init__(self, cfg, model_dir: str, rank: int, world: int, master: tuple[str, int], engine=None):
        self.cfg, self.model_dir, self.rank, self.world, self.master = cfg, model_dir, rank, world, master
        self.engine = engine  # a RolloutEngine, a Ray actor handle (rank 0), or None

    def setup(self, total_optimizer_steps: int) -> dict:
        from runtime import megatron as rt
        from rl.policy import Policy

        torch.set_num_threads(max(1, self.cfg.ray.threads_per_actor))
        if self.world > 1:  # one rank (possibly inside the driver) keeps a private store: rt.init_distributed
            os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0",
                              MASTER_ADDR=self.master[0], MASTER_PORT=str(self.master[1]))
        m = self.cfg.model
        rt.init_distributed(tp=m.tp, pp=m.pp, ep=m.ep, etp=m.etp, cp=m.cp, seed=self.cfg.run.seed, vpp=m.vpp)
        r3 = self.cfg.rollout.routing_replay
        seed = self.cfg.run.seed
        self.policy = Policy(self.model_dir, m, optim=self.cfg.optim, total_steps=total_optimizer_steps,
                             routing_replay=r3, seed=seed)
        need_ref = self.cfg.loss.kl_coef > 0 or self.cfg.run.log_kl
        self.ref = Policy(self.model_dir, m, routing_replay=r3, seed=seed) if need_ref else None
        if self.engine is not None and not isinstance(self.engine, RolloutEngine):
            self.engine = RemoteEngine(self.engine)
        self.sync = None
        return {"rank": self.rank, "pid": os.getpid()}

    def logprobs(self, batch: dict) -> Optional[dict]:
        """old (and reference) log-probs; with routes (R3) replayed, plus the trainer's own routing's
        log-probs and agreement with the engine's (rl.routing)."""
        mbs, routes = self.cfg.run.micro_batch_size, batch.get("routes_BSLK")
        tokens, lengths = batch["tokens_BS"], batch["lengths_B"]
        old, _ = self.policy.logprobs(tokens, lengths, micro_batch_size=mbs, routes_BSLK=routes)
        ref = self.ref.logprobs(tokens, lengths, micro_batch_size=mbs, routes_BSLK=routes)[0] if self.ref else None
        out = {"old_logp_BT": old, "ref_logp_BT": ref}
        if routes is not None:
            out["old_logp_no_replay_BT"], out["routing"] = self.policy.routing_agreement(tokens, lengths, routes,
                                                                                          micro_batch_size=mbs)
        return out if self.rank == 0 else None

    def train(self, batch: dict) -> Optional[list[dict]]:
        run = self.cfg.run
        B = batch["tokens_BS"].shape[0]
        if B % run.mini_batches:
            raise ValueError(f"batch of {B} sequences does not split into run.mini_batches={run.mini_batches}")
        size = B // run.mini_batches
        out = []
        for _ in range(run.ppo_epochs):
            for k in range(run.mini_batches):
                mini = {n: (v[k * size:(k + 1) * size] if isinstance(v, torch.Tensor) else v)
                        for n, v in batch.items()}
                out.append(self.policy.train_mini_batch(mini, self.cfg.loss, micro_batch_size=run.micro_batch_size))
        return out if self.rank == 0 else None

    def sync_weights(self, version: Optional[int] = None) -> Optional[dict]:
        """Collective: the policy's weights into the engine (completeness-checked by the engine), which
        then stamps its samples with `version` (the trainer's step count). With LoRA only the adapters
        travel (the engine keeps the frozen base it started from)."""
        from rl.sync.weight_sync import WeightSync

        if self.policy.lora_sites:
            return self._sync_lora(version or 0)
        if self.sync is None:
            self.sync = WeightSync(self.policy.chunks, self.policy.hf_config,
                                   engine_dtype=engine_dtype(self.cfg, self.policy.hf_config),
                                   bucket_bytes=self.cfg.rollout.bucket_bytes)
        stats = self.sync.sync(self.engine if self.rank == 0 else None)
        if self.rank == 0 and version is not None:
            self.engine.set_weight_version(version)
        return {"seconds": stats.seconds, "buckets": stats.buckets, "hf_bytes": stats.hf_bytes} if self.rank == 0 else None

    def _sync_lora(self, version: int) -> Optional[dict]:
        import time

        from mapping.lora import peft_config
        from rl.lora import peft_tensors

        t0 = time.perf_counter()
        tensors = peft_tensors(self.policy.chunks)
        if self.rank != 0:
            return None
        lora = self.cfg.model.lora
        sent = self.engine.set_lora(tensors, peft_config(self.policy.lora_sites, lora.rank, lora.alpha, lora.dropout),
                                    version)
        return {"seconds": time.perf_counter() - t0, "buckets": 1, "hf_bytes": sent}

    def save(self, path: str, trainer_state: dict) -> None:
        from rl import checkpoint

        checkpoint.save(self.policy, Path(path), trainer_state)

    def load(self, path: str) -> dict:
        from rl import checkpoint

        return checkpoint.load(self.policy, Path(path))

    def save_model(self, work: str) -> None:
        from rl import checkpoint

        checkpoint.save_model(self.policy, Path(work))

    def shutdown(self) -> None:
        from runtime import megatron as rt

        rt.destroy_distributed()


# ------------------------------------------------------------------------------ the cluster
class Cluster:
    def __init__(self, cfg, model_dir: Path, engine_dir: Path, total_optimizer_steps: int):
        self.cfg = cfg
        self.ray = None
        world = cfg.world_size
        master = ("127.0.0.1", free_port())
        if cfg.ray.enabled:
            self._start_ray(cfg, model_dir, engine_dir, world, master)
        else:
            if world != 1:
                raise ValueError(f"ray.enabled=false runs one trainer process, but tp*pp*cp*dp = {world}; "
                                 "enable Ray or use a layout of 1")
            _release_private_world()
            self._engine_local = make_engine(cfg, engine_dir, release_process_group=cfg.rollout.engine == "vllm")
            self.engine = self._engine_local
            self.workers = [TrainerWorker(cfg, str(model_dir), 0, 1, master, engine=self._engine_local)]
        self.trainers("setup", total_optimizer_steps)

    def _start_ray(self, cfg, model_dir, engine_dir, world, master) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as PGS

        self.ray = ray
        if not ray.is_initialized():
            os.environ["RAY_AUTH_MODE"] = "disabled"
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                                "RAY_AUTH_MODE": "disabled", "VLLM_LOGGING_LEVEL": "ERROR",
                                "PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning"}}
            kw = dict(include_dashboard=False, runtime_env=env, log_to_driver=True)
            if cfg.ray.address:
                ray.init(address=cfg.ray.address, **kw)
            else:
                ray.init(num_cpus=cfg.ray.num_cpus, _temp_dir=ray_temp_dir(Path(cfg.run.dir)), **kw)
        r, cpu = cfg.ray, 0.01  # scheduling only: threads are set per actor
        t_bundle = {"CPU": cpu, **({"GPU": r.gpus_per_trainer} if r.gpus_per_trainer else {})}
        e_bundle = {"CPU": cpu, **({"GPU": r.gpus_per_engine} if r.gpus_per_engine else {})}
        if r.mode == "colocated":
            first = {k: t_bundle.get(k, 0) + e_bundle.get(k, 0) for k in set(t_bundle) | set(e_bundle)}
            pg = placement_group([first] + [t_bundle] * (world - 1), strategy="STRICT_PACK")
            ray.get(pg.ready())
            self.pgs, engine_at, trainer_at = [pg], (pg, 0), [(pg, i) for i in range(world)]
        else:
            tpg = placement_group([t_bundle] * world, strategy="PACK")
            epg = placement_group([e_bundle], strategy="PACK")
            ray.get([tpg.ready(), epg.ready()])
            self.pgs, engine_at, trainer_at = [tpg, epg], (epg, 0), [(tpg, i) for i in range(world)]

        def opts(at, gpus):
            return dict(num_cpus=cpu, num_gpus=gpus, max_restarts=0,
                        scheduling_strategy=PGS(placement_group=at[0], placement_group_bundle_index=at[1]))

        self.engine_handle = ray.remote(RolloutWorker).options(**opts(engine_at, r.gpus_per_engine)).remote(
            cfg, str(engine_dir))
        self.engine = RemoteEngine(self.engine_handle)
        Trainer = ray.remote(TrainerWorker)
        self.workers = [Trainer.options(**opts(trainer_at[i], r.gpus_per_trainer)).remote(
            cfg, str(model_dir), i, world, master, self.engine_handle if i == 0 else None) for i in range(world)]

    def trainers(self, method: str, *args):
        """Call `method` on every trainer rank (collectively); rank 0's result."""
        if self.ray is None:
            return getattr(self.workers[0], method)(*args)
        return self.ray.get([getattr(w, method).remote(*args) for w in self.workers])[0]

    def shutdown(self) -> None:
        if self.ray is None:
            self.workers[0].shutdown()
            return
        for h in [*self.workers, getattr(self, "engine_handle", None)]:
            if h is not None:
                self.ray.kill(h)
        for pg in getattr(self, "pgs", []):
            self.ray.util.remove_placement_group(pg)


def _release_private_world() -> None:
    """Local mode builds vLLM before the trainer's group; a one-process world left by an earlier step
    in this process (e.g. hf2mcore's planning world) is torn down first."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("ray.enabled=false inside a multi-process torch.distributed job: launch rl/train.py "
                               "as one process, or enable Ray")
        from runtime import megatron as rt

        rt.destroy_distributed()


def ray_temp_dir(run_dir: Path) -> str:
    """RUN/ray, unless that path is too long for Ray's Unix sockets (then a short one, said aloud)."""
    path = (run_dir / "ray").resolve()
    # Ray adds "/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store" (up to ~66 characters) and an
    # AF_UNIX path holds 107: a 45-character RUN/ray already failed with a 5-digit pid
    if len(str(path)) > 40:
        import hashlib
        import tempfile

        short = Path(tempfile.gettempdir()) / f"ray_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        print(f"note: {path} is too long for Ray's socket paths; Ray's files go to {short}", file=sys.stderr)
        path = short
    path.mkdir(parents=True, exist_ok=True)
    return str(path)
