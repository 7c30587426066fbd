"""Live sync into vLLM for DeepSeek-V3 (MLA, dense-then-MoE, shared experts, the fp32 router
expert bias): an EP=2 fp32 trainer, a bf16 engine in rank 0's process. After the second optimizer
step the engine's prompt logprobs equal, bitwise, those of an engine started from the mcore2hf export
of the trainer's weights (cast to bf16 by vLLM, as the sync casts); after each they stay within bf16
noise of the trainer's own; a withheld expert tensor fails the sync naming it. Needs the vLLM-CPU repairs
of runtime.patches.vllm: cpu_rope_3d (at start-up) and cpu_moe_prepack (on reload)."""
import pytest

from test_weight_sync import check_live_sync, live_sync


@pytest.mark.vllm
@pytest.mark.multiproc
def test_live_sync_deepseek_ep2_trainer_into_bf16_vllm(tmp_path):
    withhold = "model.layers.2.mlp.experts.5.down_proj.weight"
    res = live_sync(tmp_path, "deepseek_v3", "fp32", 1, 2, "bfloat16", withhold)
    check_live_sync(res, withhold, tolerance=0.5)  # bf16 engine (with MoE routing) vs fp32 trainer
    assert res["steps"][0]["fixes"] == {"cpu_moe_prepack": 3, "mla_kv_b_proj": 0, "cpu_tied_head": 0}  # untied head
