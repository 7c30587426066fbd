"""Gemma 3 pieces, each against transformers 5.19 (the truth), not against our own code: the
zero-centred RMSNorm (``runtime.modules.TorchNorm`` vs ``Gemma3RMSNorm``), whole decoder layers built
from the family's layer spec (a sliding one with the local rope base, a global one with the linearly
scaled global base; post norms, q/k norms, window, softmax scale, GeGLU) vs ``Gemma3DecoderLayer``
with weights moved by the family's rules, the rope choice per layer (vs ``Gemma3RotaryEmbedding``),
the embedding scale rounded to bf16 (vs ``Gemma3TextScaledWordEmbedding``), the config refusals and
both config vintages (published keys, transformers 5's ``rope_parameters`` per layer type), and
validate leaving out its Megatron-LM consumer stage.

Whole-model checks (conversion, logits at TP1/TP2, round trips, validate, vLLM, zoo) are in
test_convert.py / test_validate.py / test_zoo.py / test_weight_sync.py.
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mapping.family import ConfigError
from mapping.registry import FAMILIES, family_for
from runtime import megatron as rt
from tools.tiny_configs import published_config

PUBLISHED = Path(__file__).with_name("fixtures") / "published"
SLIDING, FULL = "sliding_attention", "full_attention"
# gemma-3-4b-pt's text_config (index ids 68436905660, 71090553656: 34 layers, 2560, 8 / 4 heads, window
# 1024, linear scaling 8 on the global layers), written as a text-only Gemma3ForCausalLM config
GEMMA3_4B_TEXT = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2560, "intermediate_size": 10240,
    "max_position_embeddings": 131072, "num_attention_heads": 8, "num_hidden_layers": 34,
    "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0, "sliding_window": 1024,
    "sliding_window_pattern": 6, "vocab_size": 262208, "torch_dtype": "bfloat16"}


def published(model: str = "gemma-3-1b-pt") -> dict:
    return json.loads((PUBLISHED / model / "config.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def mcore():
    rt.init_local()
    yield


def tiny(**change) -> dict:
    return {**published_config("gemma3"), **change}


def hf_config(cfg: dict):
    from transformers import Gemma3TextConfig

    hc = Gemma3TextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    hc._attn_implementation = "eager"
    return hc


# --------------------------------------------------------------------------- the norm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_centred_norm_is_gemma3_rmsnorm(dtype):
    from megatron.core.transformer import TransformerConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from runtime.modules import TorchNorm

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, normalization="RMSNorm",
                            layernorm_zero_centered_gamma=True, params_dtype=dtype, use_cpu_initialization=True)
    ours, theirs = TorchNorm(cfg, 64, eps=1e-6), Gemma3RMSNorm(64, eps=1e-6)
    assert torch.equal(ours.weight, torch.zeros(64, dtype=dtype))  # zero = identity gain, as HF initialises
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, generator=g)
    with torch.no_grad():
        ours.weight.copy_(w.to(dtype))
        theirs.weight.copy_(w.to(dtype))
    theirs.to(dtype)
    x = (3 * torch.randn(5, 2, 64, generator=g)).to(dtype)
    assert torch.equal(ours(x), theirs(x))


# --------------------------------------------------------------------------- layers
def _layers(cfg: dict, layer_number: int):
    """(MCore layer ``layer_number`` from the family's spec, transformers' Gemma3DecoderLayer
    ``layer_number - 1``), same random weights, moved by the family's rules."""
    from megatron.core.transformer.spec_utils import build_module
    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

    from mapping.entries import expand
    from mapping.rules import to_mcore

    fam = family_for(cfg)
    m = fam.read_config(cfg)
    config = rt.transformer_config(m)
    block = rt.layer_spec(config, "local", "gemma3")
    ours = build_module(block.layer_specs[layer_number - 1], config=config, layer_number=layer_number).eval()
    theirs = Gemma3DecoderLayer(hf_config(cfg), layer_number - 1).eval()
    g = torch.Generator().manual_seed(layer_number)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.ndim == 2 else 2))
    hf = {f"model.layers.{layer_number - 1}.{k}": v for k, v in theirs.state_dict().items()}
    prefix = f"decoder.layers.{layer_number - 1}."
    state = {e.mcore[len(prefix):]: to_mcore(e.rule, [hf[h] for h in e.hf], m.shapes)
             for e in expand(fam.rules(m), m) if e.mcore.startswith(prefix)}
    assert set(hf) == {h for e in expand(fam.rules(m), m) if e.mcore.startswith(prefix) for h in e.hf}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return ours, theirs, m, config


def _hf_forward(layer, cfg: dict, x_BSH: torch.Tensor) -> torch.Tensor:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    hc = layer.config
    B, S, _ = x_BSH.shape
    pos = torch.arange(S)[None].expand(B, -1)
    kind = hc.layer_types[layer.layer_idx]
    make = create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask
    mask = make(config=hc, inputs_embeds=x_BSH, attention_mask=None, past_key_values=None, position_ids=pos)
    rope = Gemma3RotaryEmbedding(hc)(x_BSH, pos, kind)
    return layer(x_BSH, position_embeddings=rope, attention_mask=mask, position_ids=pos)


def _mcore_forward(layer, m, x_BSH: torch.Tensor) -> torch.Tensor:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    S = x_BSH.shape[1]
    rope = RotaryEmbedding(kv_channels=m.transformer["kv_channels"], rotary_percent=1.0,
                           use_cpu_initialization=True, **m.rope)(S)  # GPTModel's: the global layers'
    out, _ = layer(hidden_states=x_BSH.transpose(0, 1).contiguous(), attention_mask=rt.causal_mask(S),
                   rotary_pos_emb=rope)
    return out.transpose(0, 1)


@pytest.mark.parametrize("layer_number,kind", [(2, SLIDING), (3, FULL)])
def test_decoder_layer_matches_transformers(layer_number, kind):
    """Tiny preset: window 8 over 24 tokens, local base 1e4 vs global 1e6 with linear scaling 8,
    query_pre_attn_scalar 48 with head_dim 64, post norms, q/k norms, tanh-GeGLU."""
    cfg = tiny()
    ours, theirs, m, _ = _layers(cfg, layer_number)
    assert hf_config(cfg).layer_types[layer_number - 1] == kind
    assert (ours.self_attention.local_rope is not None) == (kind == SLIDING)
    assert (ours.self_attention.core_attention.window is not None) == (kind == SLIDING)
    x = torch.randn(2, 24, cfg["hidden_size"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got = _hf_forward(theirs, cfg, x), _mcore_forward(ours, m, x)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_each_gemma_difference_matters_in_the_layer():
    """The layer test is not vacuous: dropping the local rope base or the window changes the output."""
    cfg = tiny()
    ours, theirs, m, _ = _layers(cfg, 2)
    x = torch.randn(2, 24, cfg["hidden_size"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = _hf_forward(theirs, cfg, x)
        ours.self_attention.local_rope = None  # the global rope on a sliding layer
        assert (_mcore_forward(ours, m, x) - want).abs().max() > 1e-2
        ours, _, _, _ = _layers(cfg, 2)
        ours.self_attention.core_attention.window = None
        assert (_mcore_forward(ours, m, x) - want).abs().max() > 1e-2


@pytest.mark.parametrize("kind", [SLIDING, FULL])
def test_rope_per_layer_type_matches_transformers(kind):
    """Sliding layers: their own RotaryEmbedding (rope_local_base_freq); global ones: GPTModel's
    (rope_theta, linear scaling as seq_len_interpolation_factor) == Gemma3RotaryEmbedding's cos/sin."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    cfg = tiny(rope_local_base_freq=20000.0)  # neither default base
    m = family_for(cfg).read_config(cfg)
    if kind == SLIDING:
        ours, _, _, _ = _layers(cfg, 1)
        emb = ours.self_attention.local_rope(40)
    else:
        emb = RotaryEmbedding(kv_channels=64, rotary_percent=1.0, use_cpu_initialization=True, **m.rope)(40)
    cos, sin = Gemma3RotaryEmbedding(hf_config(cfg))(torch.zeros(1), torch.arange(40)[None], kind)
    torch.testing.assert_close(emb[:, 0, 0].cos(), cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(emb[:, 0, 0].sin(), sin[0], rtol=0, atol=1e-6)


def test_embedding_scale_is_rounded_to_bf16_like_transformers(monkeypatch):
    """hidden 3072: sqrt = 55.43, 55.5 in bf16 (transformers PR #29402); the first layer multiplies
    its input exactly as Gemma3TextScaledWordEmbedding does, later layers leave it alone."""
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    from runtime.gemma import Gemma3TransformerLayer

    seen = []
    monkeypatch.setattr(TransformerLayer, "_forward_attention", lambda self, h, *a, **k: seen.append(h))
    emb = Gemma3TextScaledWordEmbedding(50, 3072, 0, embed_scale=3072 ** 0.5).to(torch.bfloat16)
    ids = torch.arange(50)[None]
    want = emb(ids)
    for number in (1, 2):
        layer = Gemma3TransformerLayer.__new__(Gemma3TransformerLayer)
        torch.nn.Module.__init__(layer)
        layer.input_multiplier = 3072 ** 0.5 if number == 1 else None
        layer._forward_attention(torch.nn.functional.embedding(ids, emb.weight))
    assert torch.equal(seen[0], want) and not torch.equal(seen[1], want)
    assert torch.equal(seen[1], torch.nn.functional.embedding(ids, emb.weight))


# --------------------------------------------------------------------------- config.json
ERRORS = [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping", "30.0"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping", "50.0"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention", "true"),
    ({"attention_bias": True}, "attention_bias", "true"),
    ({"hidden_activation": "gelu"}, "hidden_activation", '"gelu"'),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type", '"yarn"'),
    ({"rope_scaling": {"rope_type": "linear", "factor": 8.0, "low_freq_factor": 1.0}},
     "rope_scaling.low_freq_factor", "1.0"),
    ({"rope_parameters": {SLIDING: {"rope_type": "dynamic", "factor": 2.0}}}, "rope_parameters.sliding_attention",
     '"dynamic"'),
    ({"rope_theta": 10000, "rope_parameters": {FULL: {"rope_theta": 1e6, "rope_type": "default"}}}, "rope_theta",
     "10000"),
    ({"sliding_window": None}, "sliding_window", "null"),
    ({"layer_types": [SLIDING] * 3}, "layer_types", "sliding_attention"),
    ({"model_type": "gemma3"}, "model_type", '"gemma3"'),
]


@pytest.mark.parametrize("change,field,value", ERRORS, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(ERRORS)])
def test_unsupported_value_is_one_line_naming_field_and_value(change, field, value):
    cfg = {**published(), **change}
    with pytest.raises(ConfigError) as err:
        family_for(cfg).read_config(cfg)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and value in msg, msg


def test_layer_pattern_and_attention_settings():
    t = family_for(published()).read_config(published()).transformer
    assert t["window_size"] == (511, 0) and t["window_attn_skip_freq"] == 6  # MCore: layer L slides unless L % 6 == 0
    assert t["softmax_scale"] == 256 ** -0.5 and t["layernorm_zero_centered_gamma"] and t["qk_layernorm"]
    assert t["embedding_multiplier"] == 1152 ** 0.5 and t["rotary_base_local"] == 10000.0
    irregular = {**published(), "num_hidden_layers": 4, "layer_types": [SLIDING, FULL, FULL, SLIDING]}
    assert family_for(irregular).read_config(irregular).transformer["window_attn_skip_freq"] == [1, 0, 0, 1]
    full = {**published(), "num_hidden_layers": 2, "layer_types": [FULL, FULL], "sliding_window": None}
    assert family_for(full).read_config(full).transformer["window_size"] is None


def test_the_4b_text_config_reads_in_both_vintages():
    """Published keys (rope_scaling on the global layers) and transformers 5's rope_parameters per
    layer type mean the same model; linear scaling becomes GPTModel's seq_len_interpolation_factor."""
    from convert.formats import transformers_config

    fam = FAMILIES["gemma3"]
    m = fam.read_config(GEMMA3_4B_TEXT)
    assert m.rope == {"rotary_base": 1e6, "seq_len_interpolation_factor": 8.0}
    assert m.transformer["rotary_interpolation_local"] is None and m.transformer["window_size"] == (1023, 0)
    assert m.tie_embeddings and m.padded_vocab_size == 262272
    written_by_transformers = transformers_config(GEMMA3_4B_TEXT, torch.bfloat16).to_dict()
    assert written_by_transformers["rope_parameters"][FULL] == {"rope_type": "linear", "factor": 8.0,
                                                                "rope_theta": 1e6}
    assert fam.read_config(written_by_transformers) == m
    assert fam.read_config(fam.write_config(m)) == m


def test_validate_leaves_out_the_megatron_lm_consumer_and_says_why(tmp_path):
    from convert.validate import consumer_flags

    m = family_for(published()).read_config(published())
    flags, why = consumer_flags("auto", tmp_path, m, torch.bfloat16)
    assert flags is None and "post-attention/post-feed-forward norms" in why
    (tmp_path / "flags.txt").write_text("--num-layers 2\n")  # named by the user: the stage runs
    assert consumer_flags(str(tmp_path / "flags.txt"), tmp_path, m, torch.bfloat16)[0] == "--num-layers 2\n"


def test_the_layer_spec_hook_refuses_other_specs():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from runtime.gemma import layer_spec

    m = family_for(tiny()).read_config(tiny())
    config = rt.transformer_config(m)
    block = rt.layer_spec(config, "local", None)
    first = block.layer_specs[0]
    attn = first.submodules.self_attention
    other = type("TERowParallelLinear", (torch.nn.Module,), {})
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, linear_proj=other))
    odd = dataclasses.replace(first, submodules=dataclasses.replace(first.submodules, self_attention=attn))
    with pytest.raises(NotImplementedError, match="--spec local"):
        layer_spec(dataclasses.replace(block, layer_specs=[odd]), config)
    assert issubclass(layer_spec(block, config).layer_specs[0].module, TransformerLayer)
    assert block.layer_specs[0].module is TransformerLayer  # the input spec is not modified


def test_hf2mcore_says_its_megatron_lm_flags_do_not_build_gemma3(tmp_path, capsys):
    """The flags file a Gemma 3 conversion writes starts by saying pretrain_gpt.py cannot build the
    model from them, and the conversion prints the same; the flags still parse."""
    from convert import hf2mcore
    from runtime import megatron_lm
    from tools.make_tiny import make_from_config

    make_from_config(tiny(), tmp_path / "hf")
    hf2mcore.run(str(tmp_path / "hf"), str(tmp_path / "out"))
    text = (tmp_path / "out" / hf2mcore.ARGS_FILE).read_text()
    first = [ln for ln in text.splitlines() if not ln.startswith("# Megatron-LM model flags")
             and not ln.startswith("# arguments are stored")][0]
    assert first.startswith("# NOT ENOUGH for pretrain_gpt.py:") and "second rope base" in first
    assert "--num-layers" in text and megatron_lm.parse_flags(text)
