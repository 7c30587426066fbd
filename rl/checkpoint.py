"""Resumable trainer checkpoints as Megatron-Core dist checkpoints, and the final HF export.

Layout (the one Megatron-LM's `--load` and `convert.formats.outdir.checkpoint_dir` understand):

    RUN/checkpoints/latest_checkpointed_iteration.txt     "12"  <- written last, by the driver
    RUN/checkpoints/iter_0000012/                         torch_dist (metadata.json, *.distcp, common.pt)

What one checkpoint holds, all through `dist_checkpointing.save` (collective over trainer ranks), under
Megatron-LM's names:
  - `model` (or `model0`, `model1`, ... with virtual pipeline stages): each chunk's
    `sharded_state_dict()`, keyed by global layer numbers: the same keys as the hf2mcore output, so
    the weights load at any TP/PP/EP;
  - `optimizer`: Megatron-Core's optimizer state, `optimizer.sharded_state_dict(...)` in the
    distributed optimizer's `fully_reshardable` format (fp32 master weights and Adam moments per
    parameter key, gathered over data parallel on save and re-sharded on load: the one format that
    loads at another pipeline size; rl.stack.RESHARDABLE);
  - `rng_state`: per-rank RNG states (torch, python) as one ShardedObject indexed by global rank;
  - `trainer`: the driver's state (step, prompt-stream position, ...), the lr schedule's state and the
    layout it was saved at, in `common.pt`.
The reference model is not saved: it is the frozen starting checkpoint. Resuming at the same layout is
bitwise; at another layout (e.g. pp=2 -> pp=1) weights and optimizer state reshard and the RNG states,
which belong to ranks that no longer exist, are not restored (said in one line).
Final export: `save_model` writes a model-only dist checkpoint (collective) and `export_hf` converts it
with `python -m convert mcore2hf` in a fresh process.
Leaves out: async saving. Without it a run cannot survive a crash, and `resume=true` could not
reproduce the uninterrupted run.
"""
from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from runtime import megatron as rt
from rl.stack import RESHARDABLE

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


def model_state(policy) -> dict:
    """Megatron-LM's model entries: `model`, or `model0`, `model1`, ... per virtual stage (with LoRA the
    adapters are in them, keyed ``lora.<MCore linear>.<HF part>.A|B``, and `lora_config` says how they
    were trained: adapter_config.json's fields, for mcore2hf --lora-only / --merge-lora)."""
    chunks = policy.chunks
    if len(chunks) == 1:
        out = {"model": rt.sharded_state_dict(chunks[0])}
    else:
        out = {f"model{i}": rt.sharded_state_dict(c) for i, c in enumerate(chunks)}
    if getattr(policy, "lora_sites", None):
        from mapping.lora import peft_config

        lora = policy.sec.lora
        out["lora_config"] = peft_config(policy.lora_sites, lora.rank, lora.alpha, lora.dropout)
    return out


def layout(policy) -> dict:
    import torch.distributed as dist

    s = policy.sec
    return {"world": dist.get_world_size(), "tp": s.tp, "pp": s.pp, "vpp": s.vpp, "ep": s.ep, "cp": s.cp, "dp": s.dp}


def sharded_state(policy, trainer_state: dict, loading: bool = False) -> dict:
    from mapping.layout import CONTENT_METADATA

    state = model_state(policy)
    state["optimizer"] = policy.stack.optimizer.sharded_state_dict(
        state, is_loading=loading, metadata={**CONTENT_METADATA, **RESHARDABLE})
    state["rng_state"] = _rng_object({"torch": torch.get_rng_state(), "python": random.getstate()})
    state["trainer"] = dict(trainer_state, scheduler=policy.stack.scheduler.state_dict(), layout=layout(policy))
    return state


def _optimizer_state(loaded: dict, requested: dict, steps: int) -> dict:
    """The loaded optimizer state in the structure this layout's optimizer asked for. The tensors are
    the checkpoint's (found by parameter key, whatever the layout); the small non-tensor part merged in
    from common.pt follows the SAVING layout's optimizer chain (one optimizer, or one per expert /
    dense split when EP > 1), so it is dropped where it does not fit, and every param group gets Adam's
    step count back from the schedule (one optimizer step per schedule step)."""
    def set_steps(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "param_groups" and isinstance(v, list):
                    for group in v:
                        group["step"] = steps
                elif k == "state" and isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()):
                    for per_param in v.values():  # the replicated optimizer's torch-Adam states (their step
                        per_param["step"] = torch.tensor(float(steps))  # is saved nowhere: MCore excludes it)
                else:
                    set_steps(v)

    def overlay(want, got):  # the request's structure; loaded values wherever there are some
        if isinstance(want, dict):
            got = got if isinstance(got, dict) else {}
            return {k: overlay(v, got.get(k)) for k, v in want.items()}
        return want if got is None else got

    out = overlay(requested, loaded)
    set_steps(out)
    return out


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
    """Collective: restore policy, optimizer, lr schedule and (at the same layout) RNG from `path`;
    returns the driver's state."""
    from megatron.core import dist_checkpointing
    import torch.distributed as dist

    saved = dist_checkpointing.load_common_state_dict(str(path))["trainer"]["layout"]
    request = sharded_state(policy, {}, loading=True)
    same = saved == layout(policy)
    if not same:
        request.pop("rng_state")
        if dist.get_rank() == 0:
            print(f"note: {path} was saved at layout {saved}, resuming at {layout(policy)}: weights and optimizer "
                  "state reshard; the per-rank RNG states are not restored", file=sys.stderr, flush=True)
    state = dist_checkpointing.load(request, str(path))
    for name, chunk in zip([k for k in model_state(policy) if k.startswith("model")], policy.chunks):
        missing, unexpected = chunk.load_state_dict(state[name], strict=False)
        if [k for k in missing if not k.endswith("_extra_state")] or unexpected:
            raise RuntimeError(f"{path}: {name} loaded with missing={missing[:5]} unexpected={unexpected[:5]}")
    trainer = dict(state["trainer"])
    scheduler = trainer.pop("scheduler")
    policy.stack.optimizer.load_state_dict(_optimizer_state(state["optimizer"], request["optimizer"],
                                                            int(scheduler["num_steps"])))
    policy.stack.scheduler.load_state_dict(scheduler)
    trainer.pop("layout")
    if same:
        torch.set_rng_state(state["rng_state"]["torch"])
        random.setstate(state["rng_state"]["python"])
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
    dist_checkpointing.save(model_state(policy), str(ckpt))  # tensors are stored by their global keys
    dist.barrier()
    if dist.get_rank() == 0:
        (work / outdir.MARKER).write_text("release\n")


def export_hf(work: Path, out: Path, hf_config_dir: Path, lora_only: bool = False) -> None:
    """`python -m convert mcore2hf` on a `save_model` output, in a fresh process: the converter plans
    with Megatron-Core models of its own, which must not see a trainer's parallel state. `lora_only`:
    the adapters as a PEFT adapter directory (the base model is the one the run started from)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # ours, not the converter's
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    cmd = [sys.executable, "-m", "convert", "mcore2hf", "--mcore-dir", str(work), "--out", str(out),
           "--hf-config", str(hf_config_dir), "--overwrite", *(["--lora-only"] if lora_only else [])]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"exporting the final policy failed: {' '.join(cmd)} exited with {r.returncode}:\n"
                           + r.stderr[-3000:])
