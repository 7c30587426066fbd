"""The MCore policy (and frozen reference): built from an hf2mcore output directory at the configured
TP/PP/EP/CP layout, loaded with MCore's own `dist_checkpointing.load`, with per-token log-probs and
entropies of padded batches and one optimizer step of the GRPO loss over micro-batches.

    policy = Policy(model_dir, cfg.model, optim=cfg.optim, total_steps=...)   # parallel state ready
    logp_BT, ent_BT = policy.logprobs(tokens_BS, lengths_B, micro_batch_size=8)
    metrics = policy.train_mini_batch(batch, cfg.loss, micro_batch_size=8)

A batch is a dict of CPU tensors over all B sequences of the (global) mini-batch; each data-parallel
rank takes its contiguous slice of B / dp rows:
  tokens_BS (int64, prompt + response, right-padded), lengths_B (real tokens per row),
  mask_BT (bool, True where position t predicts a response token), adv_B, old_logp_BT,
  and optionally ref_logp_BT, rollout_logp_BT (when loss.correction needs the rollout log-probs).
The loss of every micro-batch is normalised by the global counts (all response tokens / sequences of
the mini-batch), so summed gradients equal the full-batch gradient whatever the micro-batching,
data or context parallelism (rl.optim sums them).

With `model.packing` the rows of each micro-batch are packed into one sequence (rl.packing, MCore's
THD format) instead of right-padded to the longest; every micro-batch reports how many token positions
it computed and how many of them were padding (the trainer logs train/pad_frac).
MoE knobs (`model.moe_*`) are passed to the TransformerConfig for MoE models only: the load-balancing
loss is off by default and the expert-bias update rate 0 (the trainer never calls Megatron's
`finalize_model_grads`, which is where the bias would be updated).
With routing replay (rl.routing, MoE only) a batch may carry `routes_BSLK`, the rollout engine's
experts per token and layer; `logprobs` and the training forward replay them, `routing_agreement`
measures how often the trainer's own routing would have agreed.
Leaves out: pipeline-parallel schedules (pp > 1 is refused with a clear error), packing under CP.
Shape legend: B sequences, S tokens, T = S - 1 predicted positions, b micro-batch rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from runtime import megatron as rt
from runtime import cp_attention, patches
from rl import packing, routing
from rl.grpo import LossConfig, grpo_loss
from rl.logprobs import packed_sequence_logprobs, sequence_logprobs
from rl.optim import AdamW, lr_at, mark_tp_summed

SUM_KEYS = ("pg_loss", "loss", "computed_positions", "padding_positions")


def read_model_config(model_dir: str | Path):
    """(hf config dict, mapping ModelConfig) of an hf2mcore output directory."""
    from mapping.registry import family_for

    path = Path(model_dir) / "hf" / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; model.path must be an hf2mcore output directory "
                                "(python -m convert hf2mcore HF_DIR OUT)")
    cfg = json.loads(path.read_text())
    return cfg, family_for(cfg, source=str(path)).read_config(cfg)


def build_model(m, sec, dtype: torch.dtype, routing_replay: bool = False):
    """This rank's GPTModel for family config `m` at the layout of `sec` (a ModelSection); with
    `routing_replay` its routers can replay given experts (rl.routing)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if sec.pp > 1:
        raise NotImplementedError("model.pp > 1: the trainer has no pipeline schedule yet; use tp/ep/cp/dp")
    moe = {}
    if m.num_experts:
        moe = dict(moe_router_load_balancing_type=sec.moe_router_load_balancing_type,
                   moe_aux_loss_coeff=sec.moe_aux_loss_coeff,
                   moe_router_bias_update_rate=sec.moe_router_bias_update_rate,
                   moe_enable_routing_replay=routing_replay)
    config = rt.transformer_config(m, tp=sec.tp, pp=sec.pp, ep=sec.ep, etp=sec.etp, cp=sec.cp,
                                   dtype=dtype, **moe)
    if not rt.has_cuda() and config.num_moe_experts:
        config.moe_token_dispatcher_type = "allgather"
    block = rt.layer_spec(config, sec.spec, m.family)
    if sec.cp > 1 and sec.spec == "local":
        block = cp_attention.substitute_cp_attention(block)
        patches.apply(["cp_rope_on_cpu"])  # MCore 0.16.1 slices rope for CP with .cuda()
    kw = m.gpt_model_kwargs()
    model = GPTModel(config=config, transformer_layer_spec=block, vocab_size=kw["vocab_size"],
                     max_sequence_length=kw["max_sequence_length"], pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=kw["tie_embeddings"],
                     **rt.rope_kwargs(config, kw["rope"])).to(rt.device())
    mark_tp_summed(model)  # q/k norms: grads summed over TP, as Megatron-Core's finalize_model_grads does
    return model


def load_weights(model, model_dir: str | Path) -> None:
    """Load an MCore torch_dist checkpoint (any TP/EP layout) into `model` with MCore's loader."""
    from convert.formats import checkpoint_dir

    ckpt = checkpoint_dir(model_dir)
    state = rt.load_checkpoint(model, ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}: loading into the policy left missing={missing[:5]} "
                           f"unexpected={unexpected[:5]}; was it converted from the same config.json?")


class Policy:
    """One rank's shard of the policy (or, with optim=None, the frozen reference)."""

    def __init__(self, model_dir: str | Path, sec, *, optim=None, total_steps: int = 1, routing_replay: bool = False):
        self.sec = sec
        self.hf_config, self.m = read_model_config(model_dir)
        self.dtype = rt.DTYPES[sec.dtype]
        if routing_replay and not self.m.num_experts:
            raise ValueError(f"rollout.routing_replay=true, but {Path(model_dir) / 'hf/config.json'} is a dense "
                             f"{self.m.family} model (no MoE router to replay); set rollout.routing_replay=false")
        self.model = build_model(self.m, sec, self.dtype, routing_replay)
        self.replay = routing.Replay(self.model) if routing_replay else None
        if sec.packing:
            packing.check_model(self.model, sec.spec)
        load_weights(self.model, model_dir)
        self.optim_cfg, self.total_steps = optim, total_steps
        self.optimizer = None
        if optim is not None:
            self.optimizer = AdamW(list(self.model.parameters()), lr=optim.lr, betas=optim.betas,
                                   eps=optim.eps, weight_decay=optim.weight_decay)
        else:
            self.model.requires_grad_(False)

    @property
    def sequence_parallel(self) -> bool:
        return bool(self.model.config.sequence_parallel)

    # -------------------------------------------------------------------- forward
    def _forward(self, tokens_bS: torch.Tensor, lengths_b: torch.Tensor, with_entropy: bool,
                 total: int | None = None, routing=None):
        """(logp_bT, entropy_bT or None, token positions computed); packed (at least `total` tokens)
        with model.packing, else right-padded to the width of tokens_bS; `routing`: an rl.routing binding."""
        kw = dict(vocab_size=self.m.vocab_size, with_entropy=with_entropy, sequence_parallel=self.sequence_parallel,
                  routing=routing)
        if self.sec.packing:
            lp, ent, p = packed_sequence_logprobs(self.model, tokens_bS, lengths_b, total=total, **kw)
            return lp, ent, p.computed
        from megatron.core import parallel_state as ps

        tp_sp = ps.get_tensor_model_parallel_world_size() if self.sequence_parallel else 1
        width = cp_attention.padded_length(tokens_bS.shape[1], ps.get_context_parallel_world_size(), tp_sp)
        return (*sequence_logprobs(self.model, tokens_bS, **kw), tokens_bS.shape[0] * width)

    def _bind(self, mode: str, routes_bSLK, lengths_b):
        """An rl.routing binding for one forward, or None without routing replay / routes."""
        if self.replay is None or (mode == "replay" and routes_bSLK is None):
            return None
        return self.replay.bind(mode, routes_bSLK, lengths_b)

    @torch.no_grad()
    def logprobs(self, tokens_BS: torch.Tensor, lengths_B: torch.Tensor, *, micro_batch_size: int,
                 with_entropy: bool = False, routes_BSLK: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logp_BT, entropy_BT or None) for all B rows (every rank computes all rows: the result is
        needed whole by the driver); positions at or past a row's last token are 0. With routing
        replay and `routes_BSLK` (the engine's experts, rl.routing), the routers replay them."""
        logp_BT, ent_BT, _ = self._logprobs("replay", tokens_BS, lengths_B, micro_batch_size, with_entropy, routes_BSLK)
        return logp_BT, ent_BT

    @torch.no_grad()
    def routing_agreement(self, tokens_BS: torch.Tensor, lengths_B: torch.Tensor, routes_BSLK: torch.Tensor, *,
                          micro_batch_size: int) -> tuple[torch.Tensor, dict[str, int]]:
        """(logp_BT with the trainer's own routing, counts): how many of the tokens the engine routed the
        trainer routes to the same experts in every MoE layer ("tokens_matched" of "tokens"), and per
        (token, layer) ("pairs_matched" of "pairs"); summed over the ranks that split the tokens."""
        from megatron.core import parallel_state as ps

        if self.replay is None:
            raise RuntimeError("routing_agreement needs a policy built with routing_replay=True")
        logp_BT, _, counts = self._logprobs("record", tokens_BS, lengths_B, micro_batch_size, False, routes_BSLK)
        t = torch.tensor(counts, dtype=torch.float64)
        for size, group in ((ps.get_tensor_model_parallel_world_size() if self.sequence_parallel else 1,
                             ps.get_tensor_model_parallel_group),
                            (ps.get_context_parallel_world_size(), ps.get_context_parallel_group)):
            if size > 1:
                torch.distributed.all_reduce(t, group=group())
        keys = ("tokens_matched", "tokens", "pairs_matched", "pairs")
        return logp_BT, {k: int(v) for k, v in zip(keys, t.tolist())}

    def _logprobs(self, mode, tokens_BS, lengths_B, micro_batch_size, with_entropy, routes_BSLK):
        self.model.eval()
        B, S = tokens_BS.shape
        logp_BT = torch.zeros(B, S - 1)
        ent_BT = torch.zeros(B, S - 1) if with_entropy else None
        counts = [0, 0, 0, 0]
        for rows in _micro_batches(B, micro_batch_size):
            L = int(lengths_B[rows].max())
            routes = routes_BSLK[rows, :L] if routes_BSLK is not None else None
            binding = self._bind(mode, routes, lengths_B[rows])
            try:
                lp, ent, _ = self._forward(tokens_BS[rows, :L], lengths_B[rows], with_entropy, routing=binding)
                if mode == "record" and binding is not None:
                    counts = [a + b for a, b in zip(counts, binding.agreement(routes))]
            finally:
                if binding is not None:
                    binding.close()
            logp_BT[rows, : L - 1] = lp.float().cpu()
            if ent is not None:
                ent_BT[rows, : L - 1] = ent.float().cpu()
        valid_BT = torch.arange(S - 1)[None, :] < (lengths_B[:, None] - 1)
        logp_BT.masked_fill_(~valid_BT, 0.0)
        if ent_BT is not None:
            ent_BT.masked_fill_(~valid_BT, 0.0)
        return logp_BT, ent_BT, counts

    # -------------------------------------------------------------------- training
    def train_mini_batch(self, batch: dict, loss_cfg: LossConfig, *, micro_batch_size: int) -> dict[str, float]:
        """Forward/backward over this rank's micro-batches, then one optimizer step."""
        from megatron.core import parallel_state as ps

        if self.optimizer is None:
            raise RuntimeError("train_mini_batch on a reference policy (built with optim=None)")
        self.model.train()
        B = batch["tokens_BS"].shape[0]
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if B % dp:
            raise ValueError(f"mini-batch of {B} sequences does not split over model.dp={dp}; make "
                             "data.prompts_per_step * rollout.n / run.mini_batches divisible by dp")
        mine = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
        counts = dict(num_tokens=float(batch["mask_BT"].sum().clamp(min=1)), num_seqs=float(B))
        acc = _MetricSums()
        self.optimizer.zero_grad()
        for rows, L, total in _aligned_micro_batches(batch["lengths_B"], dp, micro_batch_size, mine.start):
            mb = _slice_rows(batch, rows)
            loss, metrics = self._loss(mb, L, loss_cfg, counts, total if self._equal_packs else None)
            loss.backward()
            acc.add(metrics, int(mb["mask_BT"].sum()))
        o = self.optim_cfg
        lr = lr_at(self.optimizer.steps, lr=o.lr, schedule=o.schedule, warmup=o.warmup_steps,
                   total=self.total_steps, min_ratio=o.min_lr_ratio)
        norm, lr = self.optimizer.step(lr, o.grad_clip)
        out = acc.reduce(ps.get_data_parallel_group())
        out.update(grad_norm=norm, lr=lr)
        return out

    @property
    def _equal_packs(self) -> bool:
        """Packs of the same micro-batch index hold equal token counts on every data-parallel rank when
        MoE tokens are dispatched across expert-parallel ranks (the allgather dispatcher gathers equal
        sizes), as the padded path cuts them to one length."""
        return bool(self.m.num_experts) and self.sec.ep > 1

    def _loss(self, mb: dict, L: int, loss_cfg: LossConfig, counts: dict, total: int | None = None):
        need_entropy_grad = loss_cfg.entropy_coef > 0
        routes = mb.get("routes_BSLK")
        binding = self._bind("replay", routes[:, :L] if routes is not None else None, mb["lengths_B"])
        try:  # the replayed choice is used in the forward only (no recomputation in backward)
            logp_bT, ent_bT, computed = self._forward(mb["tokens_BS"][:, :L], mb["lengths_B"], True, total, binding)
        finally:
            if binding is not None:
                binding.close()
        if not need_entropy_grad:
            ent_bT = ent_bT.detach()
        cut = lambda k: None if mb.get(k) is None else mb[k][:, : L - 1].to(logp_bT.device)  # noqa: E731
        loss, metrics = grpo_loss(loss_cfg, logp_BT=logp_bT, adv_B=mb["adv_B"].to(logp_bT.device),
                                  mask_BT=cut("mask_BT"), old_logp_BT=cut("old_logp_BT"),
                                  ref_logp_BT=cut("ref_logp_BT"), rollout_logp_BT=cut("rollout_logp_BT"),
                                  entropy_BT=ent_bT, **counts)
        metrics.update(computed_positions=computed, padding_positions=computed - int(mb["lengths_B"].sum()))
        return loss, metrics


def _micro_batches(n: int, size: int, offset: int = 0):
    if size < 1:
        raise ValueError(f"run.micro_batch_size={size}: must be >= 1")
    for i in range(0, n, size):
        yield slice(offset + i, offset + min(n, i + size))


def _aligned_micro_batches(lengths_B: torch.Tensor, dp: int, size: int, offset: int):
    """This rank's micro-batches as (rows, L, total): each cut to the longest sequence L of the same
    micro-batch index on any data-parallel rank (MoE token dispatch across EP gathers equal-length
    activations), and the most real tokens `total` such a micro-batch holds on any rank (for packs)."""
    per_rank = lengths_B.shape[0] // dp
    for rows in _micro_batches(per_rank, size):
        per_dp = [lengths_B[d * per_rank + rows.start: d * per_rank + rows.stop] for d in range(dp)]
        L = max(int(x.max()) for x in per_dp)
        yield slice(offset + rows.start, offset + rows.stop), L, max(int(x.sum()) for x in per_dp)


def _slice_rows(batch: dict, rows: slice) -> dict:
    return {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class _MetricSums:
    """Token-weighted means of per-micro-batch metrics; sums for losses; maxima for *_max."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.maxes: dict[str, float] = {}
        self.tokens = 0

    def add(self, metrics: dict, n_tokens: int) -> None:
        for k, v in metrics.items():
            v = float(v)
            if k.endswith("_max"):
                self.maxes[k] = max(self.maxes.get(k, float("-inf")), v)
            else:
                self.sums[k] = self.sums.get(k, 0.0) + (v if k in SUM_KEYS else v * n_tokens)
        self.tokens += n_tokens

    def reduce(self, group) -> dict[str, float]:
        import torch.distributed as dist

        keys, mkeys = sorted(self.sums), sorted(self.maxes)
        s = torch.tensor([self.sums[k] for k in keys] + [float(self.tokens)], dtype=torch.float64)
        mx = torch.tensor([self.maxes[k] for k in mkeys], dtype=torch.float64)
        if dist.get_world_size(group) > 1:
            dist.all_reduce(s, group=group)
            if len(mkeys):
                dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
        tokens = max(float(s[-1]), 1.0)
        out = {k: float(v) if k in SUM_KEYS else float(v) / tokens for k, v in zip(keys, s[:-1])}
        out.update({k: float(v) for k, v in zip(mkeys, mx)})
        return out
