"""torchrun worker (2 ranks): a trainer at --tp/--ep with a vLLM engine in rank 0's process.

Rank 0 starts the engine from --hf (the original weights) *before* the trainer's process group
(the engine releases its own). Both ranks load --mcore (hf2mcore of --hf), then per step: an
Adam step (Megatron-Core's DDP and optimizer, rl.stack) on a next-token loss over fixed sequences, a live sync, the engine's prompt logprobs
and the trainer's own logprobs of the same sequences, and a torch_dist save of the weights (for
the test to export with mcore2hf and start a reference engine from). Finally a sync that drops
--withhold on the way must fail naming it, and a complete sync afterwards must restore the
step's logprobs exactly. Rank 0 writes everything to --out/result.json.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import megatron as rt
from rl.rollout.base import WeightUpdateError  # noqa: E402
from rl.sync.weight_sync import WeightSync  # noqa: E402
from sync_helpers import Withholding  # noqa: E402


def sequences(vocab: int, n: int = 3, length: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return torch.randint(2, vocab, (n, length), generator=g).tolist()


def trainer_logprobs(model, m, seqs) -> torch.Tensor:
    """log p(seq[t] | seq[:t]) from the trainer's own forward, [N, S - 1] (TP-gathered logits)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ids = torch.tensor(seqs)
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(ids, pos, rt.causal_mask(ids.shape[1])))
    logp = torch.log_softmax(logits[..., : m.vocab_size].float(), dim=-1)
    return logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)


def train_step(stack, m, seqs) -> None:
    """One Adam step of a next-token loss through Megatron-Core's stack (rl.stack): DDP, then
    finalize_model_grads, which keeps the replicas of TP-shared parameters equal."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    ids = torch.tensor(seqs)
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    stack.zero_grad()
    logits = stack.chunks[0](ids, pos, rt.causal_mask(ids.shape[1]))            # [B, S, Vp / tp]
    loss = vocab_parallel_cross_entropy(logits[:, :-1].float().contiguous(), ids[:, 1:]).mean()
    loss.backward()
    finalize_model_grads(stack.chunks)
    stack.optimizer.step()


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--mcore", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--engine-dtype", default="float32")
    ap.add_argument("--withhold", required=True)
    ap.add_argument("--bucket-bytes", type=int, default=2 << 20)
    return ap.parse_args()


def build_trainer(a):
    from convert.formats import checkpoint_dir
    from mapping.registry import family_for

    cfg = json.loads((Path(a.hf) / "config.json").read_text())
    m = family_for(cfg).read_config(cfg)
    from rl.config import OptimSection
    from rl.stack import make_stack

    model = rt.build_from(m, dtype=torch.float32, tp=a.tp, ep=a.ep)
    model.load_state_dict(rt.load_checkpoint(model, checkpoint_dir(a.mcore)))
    stack = make_stack([model], OptimSection(lr=3e-3, grad_clip=0.0), torch.float32, total_updates=2)
    sync = WeightSync(model, cfg, engine_dtype=rt.DTYPES[a.engine_dtype], bucket_bytes=a.bucket_bytes)
    return model, stack, m, sync


def steps(a, engine, model, stack, m, sync, seqs, rank) -> list[dict]:
    """Two optimizer steps, each followed by a sync, both logprob views and a torch_dist save."""
    from megatron.core import dist_checkpointing

    out = []
    for step in (1, 2):
        train_step(stack, m, seqs)
        stats = sync.sync(engine)
        mine = trainer_logprobs(model, m, seqs)
        ckpt = Path(a.out) / f"mcore_step{step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
        if rank == 0:
            got = torch.stack(engine.prompt_logprobs(seqs))
            out.append(dict(
                step=step, engine=got.tolist(), trainer=mine.tolist(), seconds=stats.seconds,
                buckets=stats.buckets, max_bucket_bytes=stats.max_bucket_bytes, bucket_bytes=a.bucket_bytes,
                peak_held_bytes=stats.peak_held_bytes, fixes=stats.engine.fixes,
                engine_params=stats.engine.engine_params))
        torch.distributed.barrier()
    return out


def main():
    a = parse_args()
    rank = int(os.environ["RANK"])
    engine = None
    if rank == 0:  # before the trainer's process group: the engine releases its own
        from rl.rollout.vllm_engine import VLLMConfig, VLLMEngine

        engine = VLLMEngine(VLLMConfig(model=a.hf, dtype=a.engine_dtype, max_model_len=256,
                                       kv_cache_bytes=64 << 20, release_process_group=True))
    rt.init_distributed(tp=a.tp, ep=a.ep, seed=5)
    model, stack, m, sync = build_trainer(a)
    seqs = sequences(m.vocab_size)
    result = {"seqs": seqs, "hf_names": sync.hf_names, "steps": steps(a, engine, model, stack, m, sync, seqs, rank)}
    try:
        sync.sync(Withholding(engine, a.withhold) if rank == 0 else None)
        result["withheld_error"] = None
    except WeightUpdateError as err:
        result["withheld_error"] = str(err)
    if rank == 0:
        after = torch.stack(engine.prompt_logprobs(seqs))
        sync.sync(engine)
        restored = torch.stack(engine.prompt_logprobs(seqs))
        result["after_withheld"], result["restored"] = after.tolist(), restored.tolist()
        (Path(a.out) / "result.json").write_text(json.dumps(result))
    else:
        sync.sync(None)
    torch.distributed.barrier()
    rt.destroy_distributed()
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main()
