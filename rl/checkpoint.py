"""Resumable trainer checkpoints as Megatron-Core dist checkpoints, and the final HF export.

Layout (the one Megatron-LM's `--load` and `convert.formats.outdir.checkpoint_dir` understand):

    RUN/checkpoints/latest_checkpointed_iteration.txt     "12"  <- written last, by the driver
    RUN/checkpoints/iter_0000012/                         torch_dist (metadata.json, *.distcp, common.pt)

What one checkpoint holds, all through `dist_checkpointing.save` (collective over trainer ranks):
  - the policy: `model.sharded_state_dict()` (same keys as the hf2mcore output, any TP/EP on load);
  - AdamW moments as ShardedTensors `optimizer.state.exp_avg.<param key>` etc., sharded like their
    parameter (MCore's `optim_state_to_sharding_state`), plus fp32 master weights for bf16 models;
    Adam's step count travels in the common state;
  - per-rank RNG states (torch, python) as one ShardedObject indexed by global rank;
  - `trainer`: the driver's state (step, prompt-stream position, ...) in `common.pt`.
The reference model is not saved: it is the frozen starting checkpoint. Resuming needs the same
world size (the RNG object is per rank); the weights and moments themselves reshard freely.
Final export: `save_model` writes a model-only dist checkpoint (collective) and `export_hf` converts it
with `python -m convert mcore2hf` in a fresh process.
Leaves out: async saving, the data-parallel-sharded optimizer. Without it a run cannot survive a
crash, and `resume=true` could not reproduce the uninterrupted run.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Optional

import torch

from runtime import megatron as rt

MARKER = "latest_checkpointed_iteration.txt"


def iter_dir(root: Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def latest(root: Path) -> Optional[tuple[int, Path]]:
    """(step, directory) of the newest complete checkpoint under `root`, or None."""
    marker = Path(root) / MARKER
    if not marker.is_file():
        return None
    step = int(marker.read_text().strip())
    path = iter_dir(root, step)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{marker} names step {step} but {path} is incomplete; delete the marker "
                                "to start over or point run.dir at another run")
    return step, path


def mark(root: Path, step: int, keep: int) -> None:
    """Publish `step` as the newest checkpoint (atomic), then prune all but the `keep` newest."""
    root = Path(root)
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(f"{step}\n")
    tmp.replace(root / MARKER)
    done = sorted(p for p in root.glob("iter_*") if (p / "metadata.json").is_file())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ sharded state
def _rng_object(data):
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", data, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _optimizer_state(policy, model_ssd: dict) -> dict:
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            make_sharded_optimizer_tensor,
                                                            optim_state_to_sharding_state)

    opt = policy.optimizer
    opt.init_state()
    id_map = get_param_id_to_sharded_param_map(model_ssd, opt.ordered())
    if len(id_map) != len(opt.ordered()):
        raise RuntimeError(f"{len(opt.ordered()) - len(id_map)} trained parameters have no sharded "
                           "checkpoint entry; the optimizer state could not be saved")
    state = opt.opt.state_dict()
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    masters = [m for g in opt.opt.param_groups for m in g["params"]]
    if any(m.dtype != p.dtype for m, p in zip(masters, opt.ordered())):
        state["master"] = {i: make_sharded_optimizer_tensor(id_map[i], m, prefix="optimizer.master")
                           for i, m in enumerate(masters)}
    return state


def sharded_state(policy, trainer_state: dict) -> dict:
    model_ssd = rt.sharded_state_dict(policy.model)
    return {"model": model_ssd, "optimizer": _optimizer_state(policy, model_ssd),
            "rng": _rng_object({"torch": torch.get_rng_state(), "python": random.getstate()}),
            "trainer": dict(trainer_state, optimizer_steps=policy.optimizer.steps)}


def save(policy, path: Path, trainer_state: dict) -> None:
    """Collective over all trainer ranks: write one resumable checkpoint into `path`."""
    from megatron.core import dist_checkpointing
    import torch.distributed as dist

    if dist.get_rank() == 0:
        if path.exists():
            shutil.rmtree(path)  # a half-written attempt at the same step
        path.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(sharded_state(policy, trainer_state), str(path))
    dist.barrier()


def load(policy, path: Path) -> dict:
    """Collective: restore policy, optimizer and RNG from `path`; returns the driver's state."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(sharded_state(policy, {}), str(path))
    policy.model.load_state_dict(state["model"], strict=False)
    opt, ostate = policy.optimizer, state["optimizer"]
    masters = ostate.pop("master", None)
    steps = int(state["trainer"]["optimizer_steps"])
    for st in ostate["state"].values():
        st["step"] = torch.tensor(float(steps))
    opt.opt.load_state_dict(ostate)
    opt.steps = steps
    with torch.no_grad():
        if masters is not None:
            ordered = [m for g in opt.opt.param_groups for m in g["params"]]
            for i, m in enumerate(ordered):
                m.copy_(masters[i])
        for p, m in zip(opt.params, opt.master):
            if m is not p:
                p.copy_(m)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    trainer = dict(state["trainer"])
    trainer.pop("optimizer_steps")
    return trainer


def save_model(policy, work: Path) -> None:
    """Collective: the policy alone as a torch_dist checkpoint root `work` (release/ + marker)."""
    from megatron.core import dist_checkpointing
    import torch.distributed as dist

    from convert.formats import outdir

    ckpt = work / "release"
    if dist.get_rank() == 0:
        shutil.rmtree(work, ignore_errors=True)
        ckpt.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(rt.sharded_state_dict(policy.model), str(ckpt))
    dist.barrier()
    if dist.get_rank() == 0:
        (work / outdir.MARKER).write_text("release\n")


def export_hf(work: Path, out: Path, hf_config_dir: Path) -> None:
    """`python -m convert mcore2hf` on a `save_model` output, in a fresh process: the converter plans
    with Megatron-Core models of its own, which must not see a trainer's parallel state."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # ours, not the converter's
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    cmd = [sys.executable, "-m", "convert", "mcore2hf", "--mcore-dir", str(work), "--out", str(out),
           "--hf-config", str(hf_config_dir), "--overwrite"]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"exporting the final policy failed: {' '.join(cmd)} exited with {r.returncode}:\n"
                           + r.stderr[-3000:])
