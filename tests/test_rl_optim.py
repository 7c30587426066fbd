"""Which gradients the trainer sums over TP although the parameters are replicated: the q/k layer
norms (each TP rank applies them to its own heads only), as Megatron-Core's finalize_model_grads
does by name. Without the tag, a TP=2 Gemma 3 trainer's two q/k-norm replicas drifted apart after one
step (live-sync test: trainer logprobs 0.036 away from a fresh load of its own checkpoint)."""
import json

import pytest

from mapping.registry import family_for
from rl.optim import TP_SUMMED, mark_tp_summed
from runtime import megatron as rt
from tools.make_tiny import cached_tiny


@pytest.mark.parametrize("family,expect", [("qwen3", True), ("gemma3", True), ("qwen2", False)])
def test_qk_norms_are_tagged_for_a_tp_sum(family, expect):
    cfg = json.loads((cached_tiny(family) / "config.json").read_text())
    m = family_for(cfg).read_config(cfg)
    rt.init_local()
    model = rt.build_from(m, meta=True)
    tagged = mark_tp_summed(model)
    names = {n for n, p in model.named_parameters() if getattr(p, TP_SUMMED, False)}
    assert bool(tagged) is expect and len(names) == tagged
    assert all("q_layernorm" in n or "k_layernorm" in n for n in names)
    assert (not expect) or {n for n in names if "q_layernorm" in n} and {n for n in names if "k_layernorm" in n}
