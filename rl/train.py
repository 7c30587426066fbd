"""GRPO on a Megatron-Core policy with a vLLM rollout engine and live weight sync.

    python rl/train.py --config rl/configs/tiny.yaml [section.field=value ...]
    python rl/train.py --help-config            # every option, its default and meaning

Each step (DeepSeekMath's GRPO, Shao et al. 2024, with the loss variants of rl.grpo):
  1. P prompts -> the engine samples G responses each (seeded by run.seed, the step and the round);
  2. rule-based rewards (rl.reward; a sample whose scoring raises gets 0, counted in reward/errors),
     optionally DAPO's overlong punishment (reward.overlong, rl.overlong); with sampling.dynamic,
     groups of equal rewards are dropped and more prompts sampled until P groups (rl.sampling);
  3. the trainer recomputes the sampling policy's log-probs (old_logp; the engine's own are kept to
     measure the mismatch) and the frozen reference's (when KL is weighted or logged); with
     rollout.routing_replay its MoE routers replay the engine's experts (rl.routing), and a second
     forward with its own routing measures routing/replay_agreement and the mismatch without replay;
  4. group-normalised advantages, each response's group named by the batch's `group_B`;
  5. run.ppo_epochs passes over run.mini_batches mini-batches: forward/backward of the GRPO loss over
     micro-batches through Megatron-Core's pipeline schedules (pp stages, virtual stages, recompute;
     truncated responses masked out with reward.overlong=filter; rows packed without padding with
     model.packing), then Megatron-Core's optimizer step (distributed optimizer, clipping, its lr
     schedule; rl.stack);
  6. live sync of the new weights into the engine, which stamps later samples with the new policy
     version; evaluation every run.eval_every steps; a resumable checkpoint every run.checkpoint_every
     steps; the final policy exported to HF.
With rollout.async_generation, step k+1's rollouts (items 1-2) are sampled during step k's items 3-5
by the weights of step k-1 (one-step off-policy, rl.pipeline; staleness bounded by rollout.max_staleness).
Departures from the textbook: old_logp comes from the trainer, not the engine (their difference is
logged as mismatch/* and can be corrected with loss.correction: truncated or masked IS); the loss
(GRPO, or GSPO with loss.policy_loss) is normalised by global
token counts (loss.aggregation), so micro-batching and parallel layout do not change it.
A dead Ray actor restarts the run from the last checkpoint (run.max_restarts times).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repository's packages, not rl/ siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from rl import checkpoint, overlong  # noqa: E402
from rl.actors import Cluster  # noqa: E402
from rl.advantages import compute_advantages  # noqa: E402
from rl.batch import PromptStream, build_batch  # noqa: E402
from rl.collect import collect_step, evaluate, rollout_metrics  # noqa: E402
from rl.config import TrainConfig, describe, load_config  # noqa: E402
from rl.corrections import correction_weights  # noqa: E402
from rl.grpo import mismatch_metrics  # noqa: E402
from rl.metrics import MetricsLog  # noqa: E402
from rl.pipeline import Rollouts, drop_stale, load_ahead, overlap, save_ahead  # noqa: E402
from rl.prepare import prepare_model, prepare_prompts  # noqa: E402


def train_step(cfg, cluster, got, step: int, times: dict) -> tuple[dict, int]:
    """Items 3-5 of the module docstring on the step's groups `got`; (metrics, tokens). The trainer is
    at policy version step - 1; `times` receives the phases' seconds (logprobs and train intervals)."""
    got, stale = drop_stale(got, step - 1, cfg.rollout.max_staleness if cfg.rollout.async_generation else 0,
                            cfg.run.mini_batches * cfg.model.dp)
    metrics = {**rollout_metrics(got), **got.metrics, **stale}
    if metrics["reward/errors"]:
        print(f"warning: step {step}: {metrics['reward/errors']} samples raised while being scored (reward 0)",
              file=sys.stderr)
    if got.metrics["data/groups_short"]:
        print(f"warning: step {step}: {got.metrics['data/groups_short']} of {cfg.data.prompts_per_step} groups "
              f"missing (all rewards equal after {cfg.sampling.max_extra_rounds} extra rounds, or too stale); "
              f"training on {len(got.prompts)}", file=sys.stderr)
    if not got.prompts:
        return metrics, 0
    batch = build_batch([p.ids for p in got.prompts], got.samples)
    batch.pop("version_B")  # checked by drop_stale
    if cfg.ray.mode == "colocated":
        cluster.engine.sleep()  # frees the engine's GPU memory for training (a no-op on CPU)
    times["train_start"] = t = time.perf_counter()
    out = cluster.trainers("logprobs", batch)
    times["logprobs"] = time.perf_counter() - t
    routing = out.pop("routing", None)
    no_replay = out.pop("old_logp_no_replay_BT", None)
    batch.update(out)
    batch["adv_B"] = compute_advantages(got.rewards_B, batch["group_B"], name=cfg.run.advantage)
    mismatch = mismatch_metrics(batch["old_logp_BT"], batch["rollout_logp_BT"], batch["mask_BT"])
    if routing is not None:
        metrics.update(routing_metrics(routing, no_replay, batch))
    # The correction's own metrics (e.g. mismatch/masked_frac) once over the whole batch: they depend on
    # old and rollout log-probs only, so every optimizer update of this step sees the same ones.
    _, correction = correction_weights(cfg.loss, batch["old_logp_BT"], batch["rollout_logp_BT"], batch["mask_BT"])
    truncated_B = overlong.truncated(got.samples)
    batch["mask_BT"] = overlong.loss_mask(cfg.reward, batch["mask_BT"], truncated_B)
    train_batch = {k: v for k, v in batch.items()
                   if v is not None and (k != "rollout_logp_BT" or cfg.loss.needs_rollout_logp)}
    t = time.perf_counter()
    per_update = cluster.trainers("train", train_batch)
    times["train_end"] = time.perf_counter()
    times["train"] = times["train_end"] - t
    computed = sum(u.pop("computed_positions") for u in per_update)
    padding = sum(u.pop("padding_positions") for u in per_update)
    metrics.update({
        "response/overlong_frac": truncated_B.float().mean(),
        "train/pad_frac": padding / max(computed, 1),
        "mismatch/logprob_abs_diff_mean": mismatch["mismatch/abs_diff_mean"],
        "mismatch/logprob_abs_diff_max": mismatch["mismatch/abs_diff_max"], "mismatch/kl_k3": mismatch["mismatch/kl_k3"],
        **correction, **{f"actor/{k}": v for k, v in combine_updates(per_update).items()},
    })
    if cfg.reward.overlong == "shape":
        metrics["reward/overlong_penalty_mean"] = (got.rewards_B - got.scores_B).mean()
    return metrics, int(batch["lengths_B"].sum())


def routing_metrics(counts: dict, no_replay_BT, batch: dict) -> dict:
    """R3 (rl.routing): the share of routed tokens the trainer, left to itself, sends to the engine's
    experts in every MoE layer (and per layer), and the mismatch its own routing would have had."""
    free = mismatch_metrics(no_replay_BT, batch["rollout_logp_BT"], batch["mask_BT"])
    return {"routing/replay_agreement": counts["tokens_matched"] / max(counts["tokens"], 1),
            "routing/replay_agreement_layer": counts["pairs_matched"] / max(counts["pairs"], 1),
            "mismatch/logprob_abs_diff_mean_no_replay": free["mismatch/abs_diff_mean"],
            "mismatch/logprob_abs_diff_max_no_replay": free["mismatch/abs_diff_max"]}


def combine_updates(per_update: list[dict]) -> dict:
    """One value per metric over a step's optimizer updates: max of *_max, last lr, else the mean."""
    out = {}
    for k in per_update[0]:
        values = [u[k] for u in per_update]
        out[k] = max(values) if k.endswith("_max") else values[-1] if k == "lr" else sum(values) / len(values)
    return out


def sync_engine(cfg, cluster, version: int) -> tuple[float, int]:
    """The policy's weights (version = steps trained; with LoRA its adapters) into the engine: (seconds,
    bytes sent)."""
    t = time.perf_counter()
    if cfg.ray.mode == "colocated":
        cluster.engine.wake()
    stats = cluster.trainers("sync_weights", version)
    return time.perf_counter() - t, int((stats or {}).get("hf_bytes", 0))


def run(cfg: TrainConfig, model_dir, engine_dir, tokenizer, prompts, eval_prompts, hook=None) -> Path:
    run_dir = Path(cfg.run.dir)
    ckpt_root = run_dir / "checkpoints"
    updates = cfg.run.steps * cfg.run.ppo_epochs * cfg.run.mini_batches
    cluster = Cluster(cfg, model_dir, engine_dir, updates)
    stream, start = PromptStream(len(prompts), cfg.run.seed, cfg.data.shuffle), 0
    rollouts = Rollouts(lambda k: collect_step(cfg, cluster.engine, tokenizer, prompts, stream, k),
                        ahead=cfg.rollout.async_generation)
    try:
        found = checkpoint.latest(ckpt_root) if cfg.run.resume else None
        if found:
            start, path = found
            stream.load_state_dict(cluster.trainers("load", str(path))["stream"])
            ahead = load_ahead(path)
            if ahead is not None and cfg.rollout.async_generation:
                rollouts.restore(*ahead)
            print(f"resumed from {path} (step {start})", flush=True)
        elif cfg.run.resume:
            print(f"run.resume=true but {ckpt_root} holds no checkpoint: starting at step 0", flush=True)
        log = MetricsLog(run_dir, cfg.logging, resume_step=start if found else None, total_steps=cfg.run.steps)
        sync_engine(cfg, cluster, start)  # the engine starts from the policy being trained
        if start == 0 and cfg.run.eval_every:
            log.write(0, evaluate(cfg, cluster.engine, tokenizer, eval_prompts))
        for step in range(start + 1, cfg.run.steps + 1):
            t0 = time.perf_counter()
            got, waited = rollouts.take(step)
            if step < cfg.run.steps:
                rollouts.launch(step + 1)  # async: sampled while this step trains
            times = {"rollout": waited}
            metrics, tokens = train_step(cfg, cluster, got, step, times)
            t = time.perf_counter()
            ahead = rollouts.settle()  # the engine must be idle before its weights change
            if ahead is not None:
                times.update(wait=time.perf_counter() - t, generate=ahead.end - ahead.start,
                             overlap=overlap((ahead.start, ahead.end), (times.pop("train_start", t), times.pop("train_end", t))))
            times["sync"], metrics["sync/bytes"] = sync_engine(cfg, cluster, step)
            metrics.update({f"timing/{k}_s": v for k, v in times.items() if k not in ("train_start", "train_end")})
            if cfg.run.eval_every and step % cfg.run.eval_every == 0:
                t = time.perf_counter()
                metrics.update(evaluate(cfg, cluster.engine, tokenizer, eval_prompts), **{"timing/eval_s": time.perf_counter() - t})
            metrics["timing/step_s"] = time.perf_counter() - t0
            metrics["perf/tokens_per_s"] = tokens / metrics["timing/step_s"]
            log.write(step, metrics)
            if cfg.run.checkpoint_every and (step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps):
                path = checkpoint.iter_dir(ckpt_root, step)
                cluster.trainers("save", str(path), {"step": step, "stream": stream.state_dict()})
                if rollouts.pending() is not None:
                    save_ahead(path, *rollouts.pending())
                checkpoint.mark(ckpt_root, step, cfg.run.keep_checkpoints)
            if hook is not None:
                hook(step, cluster)
            if cfg.run.stop_at == step:
                break
        else:
            if cfg.run.export_hf:
                cluster.trainers("save_model", str(run_dir / "final_mcore"))
                if cfg.model.lora.rank:
                    checkpoint.export_hf(run_dir / "final_mcore", run_dir / "lora", Path(model_dir) / "hf", lora_only=True)
                    print(f"exported the final adapters to {run_dir / 'lora'} (PEFT; the base is {model_dir}/hf)",
                          flush=True)
                else:
                    checkpoint.export_hf(run_dir / "final_mcore", run_dir / "hf", Path(model_dir) / "hf")
                    print(f"exported the final policy to {run_dir / 'hf'} (Hugging Face format)", flush=True)
        log.close()
        return log.path
    finally:
        rollouts.close()
        cluster.shutdown()


def train(cfg: TrainConfig, hook=None) -> Path:
    """Prepare, run, and on a dead actor resume from the last checkpoint; returns metrics.jsonl."""
    t0 = time.time()
    model_dir, engine_dir = prepare_model(cfg)
    check_model(cfg, model_dir)
    tokenizer, prompts, eval_prompts, skipped = prepare_prompts(cfg, model_dir)
    if skipped:
        print(f"note: {skipped} rows skipped (prompt longer than data.max_prompt_tokens)", file=sys.stderr)
    restarts = 0
    try:
        while True:
            try:
                path = run(cfg, model_dir, engine_dir, tokenizer, prompts, eval_prompts, hook)
                break
            except Exception as err:
                if not _actor_died(err) or restarts >= cfg.run.max_restarts:
                    raise
                restarts += 1
                print(f"error: a Ray actor died ({type(err).__name__}: {str(err).splitlines()[0]}); restarting "
                      f"from the last checkpoint in {cfg.run.dir}/checkpoints (restart {restarts}/"
                      f"{cfg.run.max_restarts})", file=sys.stderr, flush=True)
                cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=True))
    finally:
        _stop_ray(cfg)
    last = cfg.run.stop_at if cfg.run.stop_at is not None else cfg.run.steps
    print(f"done: trained to step {last}, metrics in {path}, {time.time() - t0:.0f} s", flush=True)
    return path


def check_model(cfg, model_dir) -> None:
    """Configuration errors that need the model's config.json, before any actor starts."""
    from rl.policy import read_model_config
    from rl.stack import check_layout

    hf_config, m = read_model_config(model_dir)
    check_layout(cfg.model, m)
    check_lora(cfg, hf_config, m)
    if cfg.rollout.routing_replay and not m.num_experts:
        raise ValueError(f"rollout.routing_replay=true, but {Path(model_dir) / 'hf/config.json'} is a dense {m.family} "
                         "model (no MoE router to replay); set rollout.routing_replay=false")


def check_lora(cfg, hf_config: dict, m) -> None:
    """model.lora against the model and the engine, before any actor starts (one-line errors)."""
    from rl.policy import lora_sites_for

    sites = lora_sites_for(hf_config, m, cfg.model.lora)
    etp = cfg.model.etp or cfg.model.tp
    if any(s.expert for s in sites) and etp > 1:
        raise ValueError(f"model.lora.targets has experts with expert tensor parallelism {etp} (model.etp, default "
                         "model.tp): expert adapters need model.etp=1")
    cpu_vllm = cfg.rollout.engine == "vllm" and cfg.ray.gpus_per_engine == 0
    if sites and cpu_vllm and m.num_experts:
        what = "adapters on routed experts" if any(s.expert for s in sites) else "LoRA on a MoE model"
        raise ValueError(f"model.lora: vLLM on CPU cannot serve {what} (its CPU MoE kernels take no LoRA); "
                         "train LoRA on a dense model here, or run the engine on GPUs (ray.gpus_per_engine > 0)")


def _actor_died(err: BaseException) -> bool:
    try:
        from ray.exceptions import RayActorError
    except ImportError:
        return False
    return isinstance(err, RayActorError)


def _stop_ray(cfg) -> None:
    if cfg.ray.enabled and cfg.ray.address is None:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python rl/train.py", description=__doc__.split("\n\n")[0],
                                 epilog="overrides: section.field=value, e.g. run.steps=8 loss.kl_coef=0.01 "
                                 "model.tp=2 ray.enabled=false; see --help-config for all fields")
    ap.add_argument("--config", help="YAML file (sections model, data, rollout, sampling, reward, loss, optim, "
                    "run, ray, logging)")
    ap.add_argument("--help-config", action="store_true", help="list every option with its default and meaning")
    ap.add_argument("overrides", nargs="*", help="section.field=value")
    args = ap.parse_args(argv)
    if args.help_config:
        print(describe())
        return
    train(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
