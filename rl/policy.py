"""The MCore policy (and frozen reference): this rank's model chunks, built from an hf2mcore output
directory at the configured TP/PP/VPP/EP/CP x DP layout, loaded with MCore's own
`dist_checkpointing.load`, trained through Megatron-Core's stack (rl.stack: DDP, the distributed
optimizer, the lr schedule) and its pipeline schedules (rl.schedule).

    policy = Policy(model_dir, cfg.model, optim=cfg.optim, total_steps=...)   # parallel state ready
    logp_BT, ent_BT = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=8)   # rank 0; None elsewhere
    metrics = policy.train_mini_batch(batch, cfg.loss, micro_batch_size=8)        # rank 0; None elsewhere

A batch is a dict of CPU tensors over all B sequences of the (global) mini-batch, the same on every
rank; each data-parallel rank takes its contiguous slice of B / dp rows:
  tokens_BS (int64, prompt + response, right-padded), lengths_B (real tokens per row),
  mask_BT (bool, True where position t predicts a response token), adv_B, old_logp_BT,
  and optionally ref_logp_BT, rollout_logp_BT (when loss.correction needs the rollout log-probs),
  routes_BSLK (the engine's experts, routing replay).
The loss is the global mini-batch's (rl.schedule: numerators per micro-batch, MCore divides by the
global loss units), so micro-batching and the parallel layout do not change it. Log-prob passes split
the rows over data parallel too; their results are gathered at global rank 0, which the driver talks to.

With `model.packing` the rows of each micro-batch are packed into one sequence (rl.packing, MCore's
THD format) instead of right-padded to the longest; every micro-batch reports how many token positions
it computed and how many of them were padding (the trainer logs train/pad_frac).
MoE knobs (`model.moe_*`) are passed to the TransformerConfig for MoE models only: the load-balancing
loss is off by default and the expert-bias update rate 0 (finalize_model_grads would otherwise update
the bias from the step's routing).
With routing replay (rl.routing, MoE only) a batch may carry `routes_BSLK`; `logprobs` and the training
pass replay them, recomputed forwards included; `routing_agreement` measures how often the trainer's own
routing would have agreed.
Shape legend: B sequences, S tokens, T = S - 1 predicted positions.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from runtime import megatron as rt
from rl import packing, routing, schedule
from rl.grpo import LossConfig
from rl.stack import build_chunks, check_layout, make_stack


def read_model_config(model_dir: str | Path):
    """(hf config dict, mapping ModelConfig) of an hf2mcore output directory."""
    from mapping.registry import family_for

    path = Path(model_dir) / "hf" / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; model.path must be an hf2mcore output directory "
                                "(python -m convert hf2mcore HF_DIR OUT)")
    cfg = json.loads(path.read_text())
    return cfg, family_for(cfg, source=str(path)).read_config(cfg)


def load_weights(chunks: list, model_dir: str | Path) -> None:
    """Load an MCore torch_dist checkpoint (any TP/PP/EP layout) into this rank's chunks."""
    from convert.formats import checkpoint_dir

    from megatron.core import dist_checkpointing

    ckpt = checkpoint_dir(model_dir)
    # one load for all chunks: the checkpoint's integrity check wants every rank's whole request at once
    request = {f"model{i}": rt.sharded_state_dict(c) for i, c in enumerate(chunks)}
    state = dist_checkpointing.load(request, str(ckpt))
    for i, chunk in enumerate(chunks):
        missing, unexpected = chunk.load_state_dict(state[f"model{i}"], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"{ckpt}: loading into the policy left missing={missing[:5]} "
                               f"unexpected={unexpected[:5]}; was it converted from the same config.json?")


def lora_sites_for(hf_config: dict, m, lora) -> list:
    """The LoRA sites of model.lora (mapping.lora; [] when rank is 0); one-line errors for bad targets."""
    if not lora.rank:
        return []
    from mapping import lora as L
    from mapping.registry import family_for

    family = family_for(hf_config)
    L.check(lora.targets, lora.rank, lora.alpha, family)
    return L.lora_sites(family, m, tuple(lora.targets))


def attach_lora(chunks: list, sites: list, lora, m, seed: int) -> None:
    """Adapters on the chunks (rl.lora), started from model.lora.init_from when it names a PEFT adapter."""
    from rl import lora as adapters

    adapters.attach(chunks, sites, lora, m, seed)
    if lora.init_from:
        tensors, config = adapters.read_peft(lora.init_from)
        where = f"model.lora.init_from={lora.init_from}"
        if int(config.get("r", -1)) != lora.rank or float(config.get("lora_alpha", -1)) != float(lora.alpha):
            raise ValueError(f"{where}: the adapter has r={config.get('r')}, lora_alpha={config.get('lora_alpha')}; "
                             f"set model.lora.rank and model.lora.alpha to them")
        adapters.check_peft_keys(sites, tensors, where)
        adapters.load_peft(chunks, tensors, where)


class Policy:
    """One rank's shard of the policy (or, with optim=None, the frozen reference)."""

    def __init__(self, model_dir: str | Path, sec, *, optim=None, total_steps: int = 1, routing_replay: bool = False,
                 seed: int = 0):
        self.sec = sec
        self.hf_config, self.m = read_model_config(model_dir)
        self.dtype = rt.DTYPES[sec.dtype]
        if routing_replay and not self.m.num_experts:
            raise ValueError(f"rollout.routing_replay=true, but {Path(model_dir) / 'hf/config.json'} is a dense "
                             f"{self.m.family} model (no MoE router to replay); set rollout.routing_replay=false")
        check_layout(sec, self.m)
        self.lora_sites = lora_sites_for(self.hf_config, self.m, sec.lora)
        self.chunks = build_chunks(self.m, sec, self.dtype, routing_replay)
        self.replays = {id(c): routing.Replay(c) for c in self.chunks} if routing_replay else {}
        if sec.packing:
            for chunk in self.chunks:
                packing.check_model(chunk, sec.spec)
        load_weights(self.chunks, model_dir)
        if self.lora_sites:  # after the base load (it holds no adapters), before DDP (adapters only train)
            attach_lora(self.chunks, self.lora_sites, sec.lora, self.m, seed)
        self.stack = None
        if optim is not None:
            self.stack = make_stack(self.chunks, optim, self.dtype, total_steps)
        else:
            for chunk in self.chunks:
                chunk.requires_grad_(False)

    @property
    def model(self):
        """The one model chunk (without virtual pipeline stages)."""
        if len(self.chunks) != 1:
            raise AttributeError(f"this policy has {len(self.chunks)} virtual-stage chunks: use .chunks")
        return self.chunks[0]

    @property
    def modules(self) -> list:
        """What the schedules run: the DDP-wrapped chunks when training, else the chunks."""
        return self.stack.chunks if self.stack is not None else self.chunks

    @property
    def sequence_parallel(self) -> bool:
        return bool(self.chunks[0].config.sequence_parallel)

    @property
    def _equal_packs(self) -> bool:
        """Packs of one micro-batch index hold equal token counts on every data-parallel rank when MoE
        tokens are dispatched across expert-parallel ranks (the allgather dispatcher gathers equal sizes)."""
        return bool(self.m.num_experts) and self.sec.ep > 1

    def _micro_batches(self, batch: dict, micro_batch_size: int) -> list:
        from megatron.core import parallel_state as ps

        return schedule.micro_batches(batch, micro_batch_size, ps.get_data_parallel_world_size(),
                                      ps.get_data_parallel_rank(), self._equal_packs and self.sec.packing,
                                      one_length=len(self.chunks) > 1)

    def _replay(self, mode: str | None):
        for r in self.replays.values():
            if mode is None:
                r.finish()
            else:
                r.start(mode)

    # -------------------------------------------------------------------- log-probs
    @torch.no_grad()
    def logprobs(self, tokens_BS: torch.Tensor, lengths_B: torch.Tensor, *, micro_batch_size: int,
                 with_entropy: bool = False, routes_BSLK: torch.Tensor | None = None):
        """(logp_BT, entropy_BT or None) for all B rows at global rank 0, (None, None) on other ranks;
        positions at or past a row's last token are 0. With routing replay and `routes_BSLK` (the
        engine's experts, rl.routing), the routers replay them."""
        replay = "replay" if self.replays and routes_BSLK is not None else None
        logp_BT, ent_BT, _ = self._logprob_pass(replay, tokens_BS, lengths_B, micro_batch_size, with_entropy,
                                                routes_BSLK)
        return logp_BT, ent_BT

    @torch.no_grad()
    def routing_agreement(self, tokens_BS: torch.Tensor, lengths_B: torch.Tensor, routes_BSLK: torch.Tensor, *,
                          micro_batch_size: int):
        """(logp_BT with the trainer's own routing, counts) at global rank 0: how many of the tokens the
        engine routed the trainer routes to the same experts in every MoE layer ("tokens_matched" of
        "tokens"), and per (token, layer) ("pairs_matched" of "pairs")."""
        if not self.replays:
            raise RuntimeError("routing_agreement needs a policy built with routing_replay=True")
        return self._logprob_pass("record", tokens_BS, lengths_B, micro_batch_size, False, routes_BSLK)[::2]

    def _logprob_pass(self, mode, tokens_BS, lengths_B, micro_batch_size, with_entropy, routes_BSLK):
        for chunk in self.modules:
            chunk.eval()
        batch = {"tokens_BS": tokens_BS, "lengths_B": lengths_B}
        if routes_BSLK is not None and mode is not None:
            batch["routes_BSLK"] = routes_BSLK
        self._replay(mode)
        try:
            got = schedule.logprob_pass(self, self.modules, self._micro_batches(batch, micro_batch_size), with_entropy)
            counts = self._agreement() if mode == "record" else None
        finally:
            self._replay(None)  # after _agreement's own finish(), a no-op
        if got is None:
            return None, None, None
        B, S = tokens_BS.shape
        logp_BT = torch.zeros(B, S - 1)
        ent_BT = torch.zeros(B, S - 1) if with_entropy else None
        for rows, lp, ent, _ in got:
            logp_BT[rows, : lp.shape[1]] = lp
            if ent_BT is not None:
                ent_BT[rows, : ent.shape[1]] = ent
        return logp_BT, ent_BT, counts

    def _agreement(self) -> dict | None:
        """Combine the chunks' "record" results: AND over chunks and pipeline stages per token, pairs
        summed; then summed over the ranks that hold distinct tokens, at global rank 0."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        fed = next(iter(self.replays.values())).fed
        valid_n = torch.cat([v for *_, v in fed]) if fed else torch.zeros(0, dtype=torch.bool)
        match_n, stage = valid_n.clone(), torch.zeros(2, dtype=torch.float64)  # pairs matched, MoE layers
        for r in self.replays.values():
            m, pairs = r.finish()
            match_n &= m
            stage += torch.tensor([pairs, len(r.layers)], dtype=torch.float64)
        flags = match_n.to(torch.int32)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=ps.get_pipeline_model_parallel_group())
            dist.all_reduce(stage, group=ps.get_pipeline_model_parallel_group())
        mine = ps.is_pipeline_last_stage() and (self.sequence_parallel or ps.get_tensor_model_parallel_rank() == 0)
        payload = (int(flags.sum()), int(valid_n.sum()), int(stage[0]), int(stage[1])) if mine else None
        got = schedule.to_rank0(payload)
        if got is None:
            return None
        parts = [g for g in got if g is not None]
        return {"tokens_matched": sum(g[0] for g in parts), "tokens": sum(g[1] for g in parts),
                "pairs_matched": sum(g[2] for g in parts), "pairs": sum(g[1] * g[3] for g in parts)}

    # -------------------------------------------------------------------- training
    def train_mini_batch(self, batch: dict, loss_cfg: LossConfig, *, micro_batch_size: int) -> dict | None:
        """Forward/backward over this rank's micro-batches, then one optimizer step; the step's metrics
        at global rank 0, None on other ranks."""
        if self.stack is None:
            raise RuntimeError("train_mini_batch on a reference policy (built with optim=None)")
        for chunk in self.stack.chunks:
            chunk.train()
        B = batch["tokens_BS"].shape[0]
        counts = dict(num_tokens=float(batch["mask_BT"].sum().clamp(min=1)), num_seqs=float(B))
        mbs = self._micro_batches(batch, micro_batch_size)
        self.stack.zero_grad()
        self._replay("replay" if self.replays and batch.get("routes_BSLK") is not None else None)
        try:
            per_mb = schedule.train_pass(self, self.stack, mbs, loss_cfg, counts)
        finally:
            self._replay(None)
        norm, lr = self.stack.step()
        if per_mb is None:
            return None
        out = schedule.reduce_metrics(per_mb)
        out.update(grad_norm=norm, lr=lr)
        return out
