"""Rollout routing replay (R3; Ma et al. 2025, "Stabilizing MoE Reinforcement Learning by Aligning
Training and Inference Routers"): the trainer's MoE routers pick exactly the experts the rollout
engine picked for each token, so that a near-tie which the engine's kernels broke one way and the
trainer's the other no longer turns into a different expert, a different log-prob and a
meaningless importance ratio. The router's scores (and their gradient) are still the trainer's:
only the top-k choice is replayed, through Megatron-Core 0.16.1's own ``RouterReplay``
(``moe/router_replay.py``; each ``TopKRouter`` owns one when ``moe_enable_routing_replay=True``, and
``topk_routing_with_score_function`` consults it: REPLAY_FORWARD gathers the router's scores at the
given indices instead of taking their top-k; RECORD keeps the indices it computed).

    replay = Replay(chunk)                  # the MoE layers of one model chunk (this rank's stage)
    replay.start("replay")                  # or "record", before a pass of the pipeline schedule
    replay.feed(routes_bSLK, row_n, pos_n, lengths_b)   # right before each micro-batch's forward
    ...                                     # forward (and backward) of the micro-batches
    match_n, pairs = replay.finish()        # "record": per-token agreement; "replay": None

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
  * pipeline stages: each stage's chunks replay their own layers (``layer_number`` is global); the
    per-token agreement of a "record" pass is combined across stages by the caller (rl.schedule);
  * activation recompute: every fed micro-batch also joins MCore's FIFO of indices for recomputed
    forwards; a pre-forward hook on every router switches it to REPLAY_BACKWARD when it runs inside
    autograd's backward (a recompute, which the 1F1B schedules run in forward order) and to
    REPLAY_FORWARD otherwise, so a recomputed forward routes exactly as the forward it repeats.
The same hook checks that the router sees as many tokens as were bound, so a layout this module does
not know fails loudly instead of replaying the wrong tokens.

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
    """The routers of one model chunk (built with ``moe_enable_routing_replay=True``) through one pass
    of the pipeline schedule: ``start(mode)``, then ``feed(...)`` right before each micro-batch's
    forward on this chunk, then ``finish()``."""

    def __init__(self, model):
        self.layers = moe_layers(model)
        missing = [h for h, r in self.layers if getattr(r, "router_replay", None) is None]
        if missing:
            raise ValueError(f"routing replay: the routers of layers {missing} were built without "
                             "moe_enable_routing_replay=True")
        self.topk = int(self.layers[0][1].topk) if self.layers else 0
        self.mode: Optional[str] = None
        self.fed: list[tuple[Optional[Tensor], Tensor, Tensor, Tensor]] = []
        self.recorded: dict[int, list[Tensor]] = {}
        for hf_layer, router in self.layers:
            router.register_forward_pre_hook(self._before(hf_layer))
            router.register_forward_hook(self._after(hf_layer))

    def start(self, mode: str) -> None:
        if mode not in ("replay", "record"):
            raise ValueError(f"routing replay mode {mode!r}: 'replay' or 'record'")
        self.mode, self.fed, self.recorded = mode, [], {h: [] for h, _ in self.layers}
        for _, router in self.layers:
            router.router_replay.clear_indices()

    def feed(self, routes_bSLK: Optional[Tensor], row_n: Tensor, pos_n: Tensor, lengths_b: Tensor) -> None:
        """Bind the next micro-batch's router tokens (the engine's experts for them, when replaying)."""
        row_n, pos_n = row_n.cpu(), pos_n.cpu()
        valid_n = known(row_n, pos_n, lengths_b.cpu())
        self.fed.append((routes_bSLK, row_n, pos_n, valid_n))
        if self.mode != "replay":
            return
        self._check_routes(routes_bSLK)
        for hf_layer, router in self.layers:
            idx_nK = gather_routes(routes_bSLK, row_n, pos_n, valid_n, hf_layer)
            experts = router.config.num_moe_experts
            if int(idx_nK.max()) >= experts:
                raise ValueError(f"routing replay: layer {hf_layer} names expert {int(idx_nK.max())} of {experts}")
            # MCore keeps a FIFO of these for recomputed forwards (REPLAY_BACKWARD, in backward order)
            router.router_replay.set_target_indices(idx_nK.to(router.weight.device))

    def _before(self, hf_layer: int):
        """Pick the router's action for this call and check it sees the tokens that were bound: the
        micro-batch just fed (forward) or, inside backward, the oldest one not yet recomputed."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        def hook(module, args):
            if self.mode is None:
                return
            rr = module.router_replay
            n = args[0].shape[0] * args[0].shape[1] if args[0].dim() == 3 else args[0].shape[0]
            if self.mode == "record":
                rr.set_router_replay_action(RouterReplayAction.RECORD)
                want = self.fed[-1][1].numel() if self.fed else n
            elif torch._C._current_graph_task_id() >= 0:  # an activation-recompute forward in backward
                rr.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
                want = rr.replay_backward_list[0].shape[0] if rr.replay_backward_list else -1
            else:
                rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
                want = rr.target_topk_idx.shape[0] if rr.target_topk_idx is not None else -1
            if n != want:
                raise RuntimeError(f"routing replay: layer {hf_layer}'s router sees {n} tokens, but {want} were "
                                   "bound; the token layout is not the one rl.logprobs derived")
        return hook

    def _after(self, hf_layer: int):
        def hook(module, args, output):
            if self.mode == "record":
                self.recorded[hf_layer].append(module.router_replay.get_recorded_indices().cpu().long())
        return hook

    def finish(self) -> Optional[tuple[Tensor, int]]:
        """End the pass. After "record" with the engine's routes fed: (bool_n, pairs) over every
        micro-batch's tokens in feed order: whether each routed token got the engine's experts in every
        MoE layer of this chunk, and how many (token, layer) pairs did; otherwise None."""
        out = None
        if self.mode == "record" and all(routes is not None for routes, *_ in self.fed):
            match, pairs = [], 0
            for i, (routes, row_n, pos_n, valid_n) in enumerate(self.fed):
                m = valid_n.clone()
                for hf_layer, _ in self.layers:
                    same = same_experts(self.recorded[hf_layer][i], gather_routes(routes, row_n, pos_n, valid_n,
                                                                                  hf_layer)) & valid_n
                    pairs += int(same.sum())
                    m &= same
                match.append(m)
            out = (torch.cat(match) if match else torch.zeros(0, dtype=torch.bool), pairs)
        for _, router in self.layers:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()
        self.mode, self.fed, self.recorded = None, [], {}
        return out

    def _check_routes(self, routes_bSLK: Optional[Tensor]) -> None:
        if routes_bSLK is None:
            raise ValueError("routing replay: the batch has no routes_BSLK (did the engine return routed experts?)")
        if not self.layers:
            return
        L, K = routes_bSLK.shape[2], routes_bSLK.shape[3]
        top = max(h for h, _ in self.layers)
        if K != self.topk or L <= top:
            raise ValueError(f"routing replay: the engine's routes hold {L} layers x top-{K}; the trainer's "
                             f"routers are top-{self.topk} up to HF layer {top}")
