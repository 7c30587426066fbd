"""gpt-oss pieces, each against transformers 5.19 on small tensors (the truth), not against our own
code: attention sinks and the sliding window in ``runtime.modules.SDPACoreAttention`` (vs
``modeling_gpt_oss.eager_attention_forward`` with transformers' own masks), the clamped SwiGLU through
Megatron-Core's MLP (vs ``GptOssExperts._apply_gate``, far past the clamp), YaRN (vs
``GptOssRotaryEmbedding``), MXFP4 (the fabrication quantiser's bytes through transformers'
``convert_moe_packed_tensors``; ``HFCheckpoint`` presenting the pairs), the config refusals, the
Megatron-LM flags, and live sync's refusal of stacked experts.

The whole-model checks (conversion, logits at TP1/TP2/EP2, round trips, validate) are in
test_convert.py / test_zoo.py / test_validate.py.
"""
import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mapping.family import ConfigError
from mapping.registry import family_for
from runtime import megatron as rt

PUBLISHED = Path(__file__).with_name("fixtures") / "published"


def published(model="gpt-oss-20b") -> dict:
    return json.loads((PUBLISHED / model / "config.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def mcore():
    rt.init_local()
    yield


def mcore_config(**kw):
    from megatron.core.transformer import TransformerConfig

    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0)
    return TransformerConfig(**{**base, **kw})


# --------------------------------------------------------------------------- attention
def hf_attention(q_sbhd, k_sbgd, v_sbgd, sinks_h, window):
    """transformers' gpt-oss eager attention with its own causal / sliding-window mask."""
    from transformers import GptOssConfig
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    S, B, H, D = q_sbhd.shape
    hc = GptOssConfig(num_attention_heads=H, num_key_value_heads=k_sbgd.shape[2], head_dim=D, hidden_size=64,
                      num_hidden_layers=2, sliding_window=window or 128)
    hc._attn_implementation = "eager"
    make = create_sliding_window_causal_mask if window else create_causal_mask
    mask = make(config=hc, inputs_embeds=torch.zeros(B, S, 64), attention_mask=None, past_key_values=None,
                position_ids=torch.arange(S)[None].expand(B, -1))
    module = types.SimpleNamespace(num_key_value_groups=H // k_sbgd.shape[2], sinks=sinks_h, training=False)
    out, _ = eager_attention_forward(module, *(t.permute(1, 2, 0, 3) for t in (q_sbhd, k_sbgd, v_sbgd)), mask,
                                     scaling=D ** -0.5)
    return out.reshape(B, S, -1).transpose(0, 1)


def attention(layer_number, window=5, softmax_type="learnable"):
    from runtime.modules import SDPACoreAttention

    cfg = mcore_config(softmax_type=softmax_type, window_size=(window - 1, 0) if window else None,
                       window_attn_skip_freq=2)
    att = SDPACoreAttention(cfg, layer_number, None, "self")
    if att.softmax_offset is not None:
        with torch.no_grad():
            att.softmax_offset.copy_(torch.randn(4, generator=torch.Generator().manual_seed(1)) * 2)
    return att


def qkv(S=20, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(S, B, 4, 16, generator=g), torch.randn(S, B, 2, 16, generator=g),
            torch.randn(S, B, 2, 16, generator=g))


@pytest.mark.parametrize("layer_number,sliding", [(1, True), (2, False), (3, True), (4, False)])
def test_sinks_and_window_match_transformers(layer_number, sliding):
    """window_attn_skip_freq=2 slides layers 1, 3 (1-based) = transformers' layer_types 0, 2."""
    att = attention(layer_number)
    assert (att.window == (4, 0)) is sliding and (att.window is None) is not sliding
    q, k, v = qkv()
    got = att(q, k, v, rt.causal_mask(q.shape[0]))
    want = hf_attention(q, k, v, att.softmax_offset.detach(), 5 if sliding else None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(att(q, k, v, None), got)  # no mask given: causal


def test_the_window_and_the_sinks_change_the_output():
    q, k, v = qkv()
    mask = rt.causal_mask(q.shape[0])
    slid, full, plain = attention(1)(q, k, v, mask), attention(2)(q, k, v, mask), attention(2, None, "vanilla")
    assert (slid - full).abs().max() > 0.1 and (full - plain(q, k, v, mask)).abs().max() > 0.1
    torch.testing.assert_close(slid[:5], full[:5], rtol=0, atol=1e-6)  # the first 5 tokens see everything anyway


def test_off_by_one_is_a_zero_sink():
    q, k, v = qkv()
    zero = hf_attention(q, k, v, torch.zeros(4), None)
    torch.testing.assert_close(attention(2, 5, "off-by-one")(q, k, v, None), zero, rtol=0, atol=1e-6)


def test_packed_sequences_attend_within_themselves_with_window_and_sinks():
    from megatron.core.packed_seq_params import PackedSeqParams

    att = attention(1)
    bounds = [0, 3, 14, 20]
    q, k, v = qkv(S=20, B=1)
    cu = torch.tensor(bounds, dtype=torch.int32)
    got = att(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu))
    want = torch.cat([att(q[a:e], k[a:e], v[a:e], None)[:, 0] for a, e in zip(bounds[:-1], bounds[1:])])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_subclass_that_overrides_forward_refuses_sinks():
    """Context parallelism's core attention (an SDPACoreAttention subclass) would ignore them."""
    from runtime.cp_attention import CPCoreAttention

    with pytest.raises(NotImplementedError, match="CPCoreAttention: config.window_size / softmax_type='learnable'"):
        CPCoreAttention(mcore_config(softmax_type="learnable"), 1, None, "self")


# --------------------------------------------------------------------------- experts, activation
def test_expert_mlp_with_the_clamp_matches_transformers():
    """One expert through Megatron-Core's MLP (config from the family, weights through the family's
    transforms) vs ``GptOssExperts``: pre-activations reach +-40, so the clamp at 7 bites."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from mapping.rules import OPS

    m = family_for(published()).read_config(published())
    t = {k: v for k, v in m.transformer.items() if k.startswith(("activation_func", "glu_", "gated_"))}
    cfg = mcore_config(num_layers=1, hidden_size=32, ffn_hidden_size=48, add_bias_linear=True, **t)
    mlp = MLP(cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    experts = GptOssExperts(GptOssConfig(hidden_size=32, intermediate_size=48, num_local_experts=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 if p.dim() == 3 else 1.0))
        mlp.linear_fc1.weight.copy_(OPS["gpt_oss_gate_up"].to_mcore([experts.gate_up_proj[1]], None))
        mlp.linear_fc1.bias.copy_(OPS["gpt_oss_gate_up_bias"].to_mcore([experts.gate_up_proj_bias[1]], None))
        mlp.linear_fc2.weight.copy_(OPS["gpt_oss_down"].to_mcore([experts.down_proj[1]], None))
        mlp.linear_fc2.bias.copy_(experts.down_proj_bias[1])
        x = torch.randn(10, 32, generator=g)
        pre = x @ experts.gate_up_proj[1] + experts.gate_up_proj_bias[1]
        assert pre.abs().max() > 20  # the clamp matters
        want = experts._apply_gate(pre) @ experts.down_proj[1] + experts.down_proj_bias[1]
        out, bias = mlp(x[:, None])
    torch.testing.assert_close((out + bias)[:, 0], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("op,shape", [("gpt_oss_gate_up", (32, 96)), ("gpt_oss_gate_up_bias", (96,)),
                                      ("gpt_oss_down", (48, 32))])
def test_transforms_invert(op, shape):
    from mapping.rules import OPS

    x = torch.randn(shape)
    (back,) = OPS[op].to_hf(OPS[op].to_mcore([x], None), None)
    assert torch.equal(back, x)


# --------------------------------------------------------------------------- YaRN
@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_matches_transformers(truncate):
    from megatron.core.models.common.embeddings import YarnRotaryEmbedding
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    cfg = dict(published(), rope_scaling={**published()["rope_scaling"], "truncate": truncate})
    r = family_for(cfg).read_config(cfg).rope
    assert r["position_embedding_type"] == "yarn" and r["yarn_correction_range_round_to_int"] is truncate
    rt.setup()
    emb = YarnRotaryEmbedding(kv_channels=64, rotary_base=r["rotary_base"], use_cpu_initialization=True,
                              scaling_factor=r["yarn_rotary_scaling_factor"], beta_fast=r["yarn_beta_fast"],
                              original_max_position_embeddings=r["yarn_original_max_position_embeddings"],
                              beta_slow=r["yarn_beta_slow"], mscale=r["yarn_mscale"],
                              mscale_all_dim=r["yarn_mscale_all_dim"],
                              correction_range_round_to_int=r["yarn_correction_range_round_to_int"])
    freqs, mscale = emb(300)
    hc = GptOssConfig(rope_parameters={**cfg["rope_scaling"], "rope_theta": 150000.0})
    cos, sin = GptOssRotaryEmbedding(hc)(torch.zeros(1), torch.arange(300)[None])
    assert mscale == pytest.approx(0.1 * torch.log(torch.tensor(32.0)).item() + 1)
    torch.testing.assert_close((freqs[:, 0, 0, :32].cos() * mscale)[None], cos, rtol=0, atol=2e-6)
    torch.testing.assert_close((freqs[:, 0, 0, :32].sin() * mscale)[None], sin, rtol=0, atol=2e-6)


# --------------------------------------------------------------------------- MXFP4
def test_fabricated_mxfp4_is_what_transformers_dequantises():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from kernels import mxfp4_dequant
    from kernels.mxfp4_reference import FP4_E2M1_VALUES
    from tools.mxfp4_quant import mxfp4_quant

    w = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(0)) * 0.3  # [E, in, out]
    w[0, :32, 0] = 0.0  # an all-zero group
    blocks, scales = mxfp4_quant(w)
    assert blocks.shape == (3, 96, 2, 16) and scales.shape == (3, 96, 2) and blocks.dtype == torch.uint8
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    ours = mxfp4_dequant(blocks, scales, layout="transformers")
    assert torch.equal(theirs.view(torch.int16), ours.view(torch.int16))
    step = torch.exp2(scales.double() - 127).repeat_interleave(32, -1).transpose(1, 2)  # [E, in, out]
    assert ((theirs.double() - w.double()).abs() <= step + 1e-12).all()  # within one e2m1 step of its scale
    assert (theirs.double().abs() / step <= max(FP4_E2M1_VALUES)).all()


def _mxfp4_folder(tmp_path, drop=None):
    from tools.mxfp4_quant import mxfp4_quant

    w = torch.randn(4, 64, 32)
    blocks, scales = mxfp4_quant(w)
    tensors = {"x.experts.gate_up_proj_blocks": blocks, "x.experts.gate_up_proj_scales": scales,
               "x.norm.weight": torch.ones(8, dtype=torch.bfloat16)}
    tensors.pop(drop, None)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_checkpoint_presents_mxfp4_pairs_as_bf16(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from convert.formats import HFCheckpoint

    ck = HFCheckpoint(_mxfp4_folder(tmp_path))
    assert sorted(ck.names()) == ["x.experts.gate_up_proj", "x.norm.weight"]
    info = ck.info("x.experts.gate_up_proj")
    assert info.shape == (4, 64, 32) and info.out_dtype == torch.bfloat16
    whole = ck.get("x.experts.gate_up_proj")
    want = convert_moe_packed_tensors(ck.raw("x.experts.gate_up_proj_blocks"), ck.raw("x.experts.gate_up_proj_scales"),
                                      dtype=torch.bfloat16)
    assert torch.equal(whole.view(torch.int16), want.view(torch.int16))
    for e in range(4):
        assert ck.info(f"x.experts.gate_up_proj[{e}]").shape == (64, 32)
        assert torch.equal(ck.get(f"x.experts.gate_up_proj[{e}]"), whole[e])
    with pytest.raises(ValueError, match="stored as MXFP4"):
        ck.raw("x.experts.gate_up_proj")


@pytest.mark.parametrize("drop,needle", [("x.experts.gate_up_proj_scales", "MXFP4 blocks without"),
                                         ("x.experts.gate_up_proj_blocks", "MXFP4 scales without")])
def test_unpaired_mxfp4_tensors_are_one_line_errors(tmp_path, drop, needle):
    from convert.formats import CheckpointError, HFCheckpoint

    with pytest.raises(CheckpointError, match=needle) as err:
        HFCheckpoint(_mxfp4_folder(tmp_path, drop))
    assert "\n" not in str(err.value)


def test_full_size_fake_checkpoint_stores_published_mxfp4_names(tmp_path):
    from convert.formats import HFCheckpoint
    from tools.fake_checkpoint import fake_checkpoint

    fake_checkpoint(PUBLISHED / "gpt-oss-20b" / "config.json", tmp_path, shard_bytes=2 * 10**9)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    layer0 = {n.split("layers.0.", 1)[1] for n in index if n.startswith("model.layers.0.")}
    assert {"mlp.experts.gate_up_proj_blocks", "mlp.experts.gate_up_proj_scales", "mlp.experts.down_proj_blocks",
            "mlp.experts.down_proj_scales", "mlp.experts.gate_up_proj_bias", "self_attn.sinks"} <= layer0
    ck = HFCheckpoint(tmp_path)
    assert ck.info("model.layers.0.mlp.experts.gate_up_proj").shape == (32, 2880, 5760)
    down = ck.info("model.layers.0.mlp.experts.down_proj")
    assert (down.blocks, down.dtype, down.out_dtype) == ("model.layers.0.mlp.experts.down_proj_blocks", torch.uint8,
                                                         torch.bfloat16)
    assert ck.info("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16  # no FP8 anywhere


# --------------------------------------------------------------------------- config
MXFP4_OTHER = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
ERRORS = [  # (changed fields, field the message names, value as config.json spells it)
    ({"swiglu_alpha": 1.5}, "swiglu_alpha", "1.5"),
    ({"attention_bias": False}, "attention_bias", "false"),
    ({"quantization_config": MXFP4_OTHER}, "quantization_config", '"lm_head"'),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}}, "quantization_config", '"fp8"'),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                       "mscale": 1.0}}, "rope_scaling.mscale", "1.0"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type", '"linear"'),
    ({"sliding_window": None}, "sliding_window", "null"),
    ({"layer_types": ["sliding_attention", "chunked_attention"] * 12}, "layer_types", "chunked_attention"),
    ({"experts_per_token": 2}, "experts_per_token", "2"),
    ({"swiglu_limit": 0}, "swiglu_limit", "0"),
]


@pytest.mark.parametrize("change,field,value", ERRORS, ids=[f for _, f, _ in ERRORS])
def test_unsupported_values_are_one_line_errors(change, field, value):
    cfg = {**published(), **change}
    with pytest.raises(ConfigError) as err:
        family_for(cfg).read_config(cfg)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and value in msg, msg


def test_supported_variants():
    read = family_for(published()).read_config
    no_rope = {k: v for k, v in published().items() if k != "rope_scaling"}  # GptOssConfig's default: YaRN
    assert read(no_rope) == read(published())
    plain = read({**published(), "rope_scaling": {"rope_type": "default"}})
    assert plain.rope == {"rotary_base": 150000.0}
    theta_only = {k: v for k, v in no_rope.items() if k != "rope_theta"} | {"rope_parameters": {"rope_theta": 5e3}}
    assert read(theta_only).rope == {"rotary_base": 5000.0}  # transformers: plain rope, not the default YaRN
    full = read({**published(), "layer_types": ["full_attention"] * 24}).transformer
    assert full["window_size"] == (127, 0) and full["window_attn_skip_freq"] == [0] * 24
    odd = read({**published(), "layer_types": ["sliding_attention"] * 23 + ["full_attention"]}).transformer
    assert odd["window_attn_skip_freq"] == [1] * 23 + [0]
    assert read({**published(), "quantization_config": None}).transformer == read(published()).transformer


# --------------------------------------------------------------------------- Megatron-LM, live sync
def test_megatron_lm_flags_build_the_gpt_oss_config():
    from runtime import megatron_lm

    args = megatron_lm.parse_flags((PUBLISHED / "gpt-oss-120b" / "megatron_lm_args.txt").read_text()
                                   + "\n--transformer-impl local")
    c = megatron_lm.transformer_config(args)
    assert (c.window_size, c.window_attn_skip_freq, c.softmax_type) == ((127, 0), 2, "learnable")
    assert (c.glu_linear_offset, c.activation_func_clamp_value, c.activation_func.__name__) == (1.0, 7.0, "quick_gelu")
    assert c.add_bias_linear and c.expert_tensor_parallel_size == 1 and c.num_moe_experts == 128
    assert (c.yarn_rotary_scaling_factor, c.yarn_original_max_position_embeddings,
            c.yarn_correction_range_round_to_int) == (32.0, 4096, False)


def test_live_sync_refuses_stacked_experts_in_one_line():
    from rl.sync.layout import SyncError
    from rl.sync.weight_sync import WeightSync

    with pytest.raises(SyncError, match=r"gpt_oss: \d+ HF tensors stack all experts \(e\.g\. model\.layers") as err:
        WeightSync([], published())
    assert "\n" not in str(err.value)


def test_validate_refuses_expert_tensor_parallelism_in_one_line():
    from convert.validate.checks import ValidateError
    from convert.validate.layouts import check_layout
    from convert.validate.worker import Layout

    m = family_for(published()).read_config(published())
    with pytest.raises(ValidateError, match="layout tp2: gpt_oss's experts have biases.*use tp2etp1"):
        check_layout(Layout.parse("tp2"), m, 32)
    check_layout(Layout.parse("tp2etp1"), m, 32)
    check_layout(Layout.parse("ep2"), m, 32)
