"""Rollout routing replay (R3; Ma et al. 2025, "Stabilizing MoE Reinforcement Learning by Aligning
Training and Inference Routers"): the trainer's MoE routers pick exactly the experts the rollout
engine picked for each token, so that a near-tie which the engine's kernels broke one way and the
trainer's the other no longer turns into a different expert, a different log-prob and a
meaningless importance ratio. The router's scores (and their gradient) are still the trainer's:
only the top-k choice is replayed, through Megatron-Core 0.16.1's own ``RouterReplay``
(``moe/router_replay.py``; each ``TopKRouter`` owns one when ``moe_enable_routing_replay=True``, and
``topk_routing_with_score_function`` consults it: REPLAY_FORWARD gathers the router's scores at the
given indices instead of taking their top-k; RECORD keeps the indices it computed).

    replay = Replay(model)                               # the MoE layers of this rank's model
    binding = replay.bind("replay", routes_bSLK, lengths_b)   # or replay.bind("record", None, lengths_b)
    sequence_logprobs(model, tokens_bS, ..., routing=binding) # calls binding(row_n, pos_n) before forward
    binding.close()                                           # after the forward (no recompute in backward)

What the engine returns (``rl.rollout.base.Sample.routed_experts``, vLLM's layout) and how it maps:
  * layers: one column per HF decoder layer, 0 in dense ones; each MCore ``TransformerLayer`` whose MLP
    has a router reads column ``layer_number - 1`` (``layer_number`` is 1-based and includes the
    pipeline offset), so DeepSeek's first-k-dense layers and Qwen2-MoE's ``mlp_only_layers`` are
    skipped by construction;
  * tokens: row t of a sample is position t of prompt + response; the batch (``rl.batch``) keeps that
    position in ``routes_BSLK[b, t]``, aligned with ``tokens_BS[b, t]``. Which (row, position) each
    router token of this rank is depends on the layout of the forward, and ``rl.logprobs`` derives it
    from the very tensors it feeds the model: row and position indices padded, context-parallel split
    and packed exactly like the tokens, then put in the model's [sequence, batch] order, then cut to
    this rank's 1/tp of the sequence under sequence parallelism (MCore scatters the embedding output
    along the sequence); a packed micro-batch is one [t, 1] sequence whose pad tail has row -1;
  * positions without an engine routing (a sequence's last token, which the engine never fed back,
    right padding, a pack's tail) get experts 0..k-1: causal attention keeps them from touching any
    position whose log-prob is used;
  * expert parallelism changes nothing: routing happens before the token dispatcher moves tokens.
A pre-forward hook on every router checks that it sees as many tokens as were bound, so a layout
this module does not know fails loudly instead of replaying the wrong tokens.

Leaves out: activation recomputation (REPLAY_BACKWARD), pipeline stages (one stage: pp = 1).
Without it the trainer recomputes its own routing and the MoE train/rollout mismatch stays.

Shape legend: b rows, S positions, L HF decoder layers, K top-k, n router tokens of this rank.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def moe_layers(model) -> list[tuple[int, torch.nn.Module]]:
    """(HF decoder layer index, router) of every MoE layer of this rank's model, in layer order."""
    out = []
    for module in model.modules():
        router = getattr(getattr(module, "mlp", None), "router", None)
        if router is not None and hasattr(module, "layer_number"):
            out.append((int(module.layer_number) - 1, router))
    return sorted(out, key=lambda x: x[0])


def router_tokens(rows_BS: Tensor, pos_BS: Tensor, sequence_parallel: bool) -> tuple[Tensor, Tensor]:
    """(row_n, pos_n) of the tokens this rank's routers see, in their order, from row / position
    indices laid out like the model's input [batch, sequence] (already context-parallel split or
    packed): MCore computes in [sequence, batch] order and, under sequence parallelism, each TP rank
    holds a contiguous 1/tp of the sequence."""
    r_SB, p_SB = rows_BS.t(), pos_BS.t()
    if sequence_parallel:
        from megatron.core import parallel_state as ps

        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        if r_SB.shape[0] % tp:
            raise ValueError(f"routing replay: {r_SB.shape[0]} positions do not split over {tp} sequence-parallel ranks")
        n = r_SB.shape[0] // tp
        r_SB, p_SB = r_SB[rank * n:(rank + 1) * n], p_SB[rank * n:(rank + 1) * n]
    return r_SB.reshape(-1), p_SB.reshape(-1)


def known(row_n: Tensor, pos_n: Tensor, lengths_b: Tensor) -> Tensor:
    """bool_n: tokens the engine routed (real rows, positions before each row's last token)."""
    lengths = lengths_b.to(row_n.device)
    return (row_n >= 0) & (pos_n >= 0) & (pos_n < lengths[row_n.clamp(min=0)] - 1)


def gather_routes(routes_bSLK: Tensor, row_n: Tensor, pos_n: Tensor, valid_n: Tensor, layer: int) -> Tensor:
    """int64 [n, K]: the engine's experts of HF layer `layer` for each router token; 0..K-1 where unknown."""
    K = routes_bSLK.shape[-1]
    r, p = row_n.clamp(min=0), pos_n.clamp(0, routes_bSLK.shape[1] - 1)
    idx_nK = routes_bSLK[r, p, layer].long()
    return torch.where(valid_n[:, None], idx_nK, torch.arange(K).expand_as(idx_nK))


def same_experts(a_nK: Tensor, b_nK: Tensor) -> Tensor:
    """bool_n: the two top-k choices hold the same experts (order within top-k does not matter)."""
    return (a_nK.sort(-1).values == b_nK.sort(-1).values).all(-1)


class Replay:
    """The routers of one model (built with ``moe_enable_routing_replay=True``) and their bindings."""

    def __init__(self, model):
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("routing replay: the model has no MoE layer (no router to replay); "
                             "set rollout.routing_replay=false for a dense model")
        missing = [h for h, r in self.layers if getattr(r, "router_replay", None) is None]
        if missing:
            raise ValueError(f"routing replay: the routers of layers {missing} were built without "
                             "moe_enable_routing_replay=True")
        self.topk = int(self.layers[0][1].topk)
        self.active: Optional[Binding] = None
        for hf_layer, router in self.layers:
            router.register_forward_pre_hook(self._check_tokens(hf_layer))

    def _check_tokens(self, hf_layer: int):
        def hook(module, args):
            b = self.active
            if b is not None and b.row_n is not None:
                n = args[0].shape[0] * args[0].shape[1] if args[0].dim() == 3 else args[0].shape[0]
                if n != b.row_n.numel():
                    raise RuntimeError(f"routing replay: layer {hf_layer}'s router sees {n} tokens, but "
                                       f"{b.row_n.numel()} were bound; the token layout is not the one "
                                       "rl.logprobs derived")
        return hook

    def bind(self, mode: str, routes_bSLK: Optional[Tensor], lengths_b: Tensor) -> "Binding":
        if mode not in ("replay", "record"):
            raise ValueError(f"routing replay mode {mode!r}: 'replay' or 'record'")
        if mode == "replay":
            self._check_routes(routes_bSLK)
        self.active = Binding(self, mode, routes_bSLK, lengths_b)
        return self.active

    def _check_routes(self, routes_bSLK: Optional[Tensor]) -> None:
        if routes_bSLK is None:
            raise ValueError("routing replay: the batch has no routes_BSLK (did the engine return routed experts?)")
        L, K = routes_bSLK.shape[2], routes_bSLK.shape[3]
        top = max(h for h, _ in self.layers)
        if K != self.topk or L <= top:
            raise ValueError(f"routing replay: the engine's routes hold {L} layers x top-{K}; the trainer's "
                             f"routers are top-{self.topk} up to HF layer {top}")


class Binding:
    """What the routers do on the next forward: replay `routes_bSLK` or record their own choice."""

    def __init__(self, replay: Replay, mode: str, routes_bSLK: Optional[Tensor], lengths_b: Tensor):
        self.replay, self.mode, self.routes_bSLK, self.lengths_b = replay, mode, routes_bSLK, lengths_b
        self.row_n: Optional[Tensor] = None
        self.pos_n: Optional[Tensor] = None

    def __call__(self, row_n: Tensor, pos_n: Tensor) -> None:
        """Bind this rank's router tokens (called by rl.logprobs right before the forward)."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self.row_n, self.pos_n = row_n.cpu(), pos_n.cpu()
        self.valid_n = known(self.row_n, self.pos_n, self.lengths_b.cpu())
        for hf_layer, router in self.replay.layers:
            rr = router.router_replay
            rr.clear_indices()
            if self.mode == "replay":
                idx_nK = gather_routes(self.routes_bSLK, self.row_n, self.pos_n, self.valid_n, hf_layer)
                experts = router.config.num_moe_experts
                if int(idx_nK.max()) >= experts:
                    raise ValueError(f"routing replay: layer {hf_layer} names expert {int(idx_nK.max())} of {experts}")
                rr.set_target_indices(idx_nK.to(router.weight.device))
                rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            else:
                rr.set_router_replay_action(RouterReplayAction.RECORD)

    def agreement(self, routes_bSLK: Tensor) -> tuple[int, int, int, int]:
        """After a "record" forward: (tokens whose experts match `routes_bSLK` in every MoE layer, tokens,
        (token, layer) pairs that match, pairs), over the tokens the engine routed."""
        match_n, pairs = None, 0
        for hf_layer, router in self.replay.layers:
            rec = router.router_replay.get_recorded_indices()
            if rec is None:
                raise RuntimeError(f"routing replay: layer {hf_layer} recorded nothing (was the forward run?)")
            want = gather_routes(routes_bSLK, self.row_n, self.pos_n, self.valid_n, hf_layer)
            same = same_experts(rec.cpu().long(), want) & self.valid_n
            pairs += int(same.sum())
            match_n = same if match_n is None else match_n & same
        n = int(self.valid_n.sum())
        return int(match_n.sum()), n, pairs, n * len(self.replay.layers)

    def close(self) -> None:
        for _, router in self.replay.layers:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()
        if self.replay.active is self:
            self.replay.active = None
