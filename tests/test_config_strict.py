"""config.json strictness: every field each family's transformers class knows (and every field the
published configs carry) is classified in the family's table as translated, checked or irrelevant;
a value Megatron-Core cannot express is a one-line ``ConfigError`` naming the field and the value;
the twelve published configs read clean; unknown extra keys are a note, not an error."""
import dataclasses
import inspect
import json
from pathlib import Path

import pytest

from mapping.config_fields import REQUIRED, Derived, Reader, by_kind, canon
from mapping.family import ConfigError
from mapping.registry import FAMILIES, family_for
from tools.tiny_configs import FAMILIES as TINY_FAMILIES
from tools.tiny_configs import published_config

PUBLISHED = Path(__file__).with_name("fixtures") / "published"
MODELS = sorted(p.name for p in PUBLISHED.iterdir() if p.is_dir())
def _class_names() -> dict[str, str]:
    """family -> the transformers config class its architecture loads with (transformers' own tables)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    by_arch = {arch: model_type for model_type, arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
    return {name: CONFIG_MAPPING[by_arch[f.architectures[0]]].__name__ for name, f in FAMILIES.items()}


CLASSES = _class_names()


def published(model: str) -> dict:
    return json.loads((PUBLISHED / model / "config.json").read_text())


def config_class(family: str):
    import transformers
    return getattr(transformers, CLASSES[family])


def class_fields(cls) -> set[str]:
    """What transformers' class reads (``__init__`` parameters) and writes (``to_dict`` keys)."""
    params = inspect.signature(cls.__init__).parameters.values()
    init = {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return init | set(cls().to_dict())


# --------------------------------------------------------------------------- (a) classification
def test_every_family_is_covered_here():
    assert set(FAMILIES) == set(CLASSES)


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_every_transformers_field_is_classified(family):
    fields = FAMILIES[family].fields
    missing = sorted(class_fields(config_class(family)) - set(fields))
    assert not missing, f"{family}: {CLASSES[family]} fields in no table of mapping/families/{family}.py: {missing}"
    kinds = by_kind(fields)
    assert sum(map(len, kinds.values())) == len(fields)  # exactly one kind each


@pytest.mark.parametrize("model", MODELS)
def test_every_published_field_is_classified(model):
    cfg = published(model)
    fields = family_for(cfg).fields
    assert sorted(set(cfg) - set(fields)) == []


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_defaults_are_transformers_defaults(family):
    """An absent key means what transformers' class makes of it: checked against the class's
    dataclass defaults and a default instance (so a transformers upgrade that moves one fails)."""
    cls, fields = config_class(family), FAMILIES[family].fields
    declared = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    instance = cls().to_dict()
    reader = Reader(fields, family, instance)
    for name, f in fields.items():
        if name not in class_fields(cls) or f.same_as or f.kind == "irrelevant" or f.default is REQUIRED:
            continue
        if f.meaning is None and not isinstance(f.default, Derived):
            assert canon(f.default) in (canon(declared.get(name)), canon(instance.get(name))), name
        # the meaning of the default instance with the key (all its spellings) removed
        keys = ("rope_theta", "rope_scaling", "rope_parameters") if f.meaning else reader.spellings(name)
        without = {k: v for k, v in instance.items() if k not in keys}
        if f.kind == "translated":  # checked: every accepted value means the same model
            assert canon(Reader(fields, family, without)(name)) == canon(reader(name)), name


# --------------------------------------------------------------------------- (b) errors
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_type": "llama3"}
YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn"}
QWEN_WINDOW = {"use_sliding_window": True, "sliding_window": 4096}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128}
FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}

ERRORS = [  # (model, changed fields, field the message names, value as config.json spells it)
    # DeepSeek-V2: group ranking MCore cannot reproduce (the published V2's 6 // 3), renormalisation
    ("DeepSeek-V2-Lite", {"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3}, "topk_method",
     '"group_limited_greedy"'),
    ("DeepSeek-V2-Lite", {"norm_topk_prob": True}, "norm_topk_prob", "true"),
    ("Qwen1.5-MoE-A2.7B", {"use_sliding_window": True, "sliding_window": 4096}, "sliding_window", "4096"),
    # rope: type, llama3 factors Megatron-Core hard-codes, yarn details it cannot express
    ("Llama-3.1-8B", {"rope_scaling": {**LLAMA3, "rope_type": "yarn"}}, "rope_scaling.rope_type", '"yarn"'),
    ("Llama-3.2-1B", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type", '"linear"'),
    ("Qwen3-8B", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type", '"dynamic"'),
    ("Qwen2.5-7B", {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     "rope_scaling.type", '"yarn"'),
    ("DeepSeek-V3", {"rope_scaling": {**LLAMA3, "type": "llama3"}}, "rope_scaling.rope_type", '"llama3"'),
    ("Moonlight-16B-A3B", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type", '"dynamic"'),
    ("Llama-3.1-8B", {"rope_scaling": {**LLAMA3, "low_freq_factor": 2.0}}, "rope_scaling.low_freq_factor", "2.0"),
    ("Llama-3.1-8B", {"rope_scaling": {**LLAMA3, "high_freq_factor": 8.0}}, "rope_scaling.high_freq_factor", "8.0"),
    ("Llama-3.2-1B", {"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 4096}},
     "rope_scaling.original_max_position_embeddings", "4096"),
    ("Llama-3.2-1B", {"rope_parameters": {**LLAMA3, "rope_theta": 500000.0, "low_freq_factor": 2.0},
                      "rope_scaling": None}, "rope_parameters.low_freq_factor", "2.0"),
    ("DeepSeek-V3", {"rope_scaling": {**YARN, "truncate": False}}, "rope_scaling.truncate", "false"),
    ("DeepSeek-R1", {"rope_scaling": {**YARN, "attention_factor": 1.2}}, "rope_scaling.attention_factor", "1.2"),
    ("Kimi-K2-Instruct", {"rope_scaling": {**YARN, "extrapolation": 2}}, "rope_scaling.extrapolation", "2"),
    ("Llama-3.1-8B", {"rope_theta": 10000.0, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
                      "rope_scaling": None}, "rope_theta", "10000.0"),
    # sliding windows shorter than the context (transformers 5 semantics, see the ok cases below)
    ("Qwen2.5-7B", {**QWEN_WINDOW, "max_window_layers": 14}, "sliding_window", "4096"),  # layers 14..27
    ("Qwen2.5-0.5B", {**QWEN_WINDOW, "max_window_layers": 12}, "sliding_window", "4096"),
    ("Qwen3-8B", {**QWEN_WINDOW, "max_window_layers": 0}, "sliding_window", "4096"),
    ("Qwen3-8B", {**QWEN_WINDOW, "max_window_layers": 36, "layer_types": ["full_attention"] * 35
                  + ["sliding_attention"]}, "sliding_window", "4096"),
    ("Qwen3-30B-A3B", {**QWEN_WINDOW, "max_window_layers": 48}, "sliding_window", "4096"),
    ("Qwen3-8B", {"layer_types": ["full_attention"] * 35 + ["chunked_attention"]}, "layer_types", "chunked_attention"),
    # activations and biases
    *[(m, {"hidden_act": "gelu"}, "hidden_act", '"gelu"') for m in
      ("Llama-3.1-8B", "Qwen2.5-0.5B", "Qwen3-0.6B", "Qwen3-30B-A3B", "DeepSeek-V3", "Moonlight-16B-A3B")],
    *[(m, {"attention_bias": True}, "attention_bias", "true") for m in
      ("Llama-3.1-8B", "Qwen3-8B", "Qwen3-235B-A22B", "DeepSeek-R1", "Moonlight-16B-A3B", "Kimi-K2-Instruct")],
    ("Llama-3.2-1B", {"mlp_bias": True}, "mlp_bias", "true"),
    ("Llama-3.1-8B", {"pretraining_tp": 2}, "pretraining_tp", "2"),
    ("Kimi-K2-Instruct", {"pretraining_tp": 8}, "pretraining_tp", "8"),
    ("Qwen2.5-7B", {"use_mrope": True}, "use_mrope", "true"),
    # quantisation other than DeepSeek's FP8 block format
    ("Qwen3-8B", {"quantization_config": GPTQ}, "quantization_config", '"gptq"'),
    ("DeepSeek-V3", {"quantization_config": {**FP8, "weight_block_size": [64, 64]}}, "quantization_config", "64"),
    ("Kimi-K2-Instruct", {"quantization_config": {**FP8, "activation_scheme": "static"}}, "quantization_config",
     '"static"'),
    # DeepSeek routing and layout
    ("DeepSeek-V3", {"scoring_func": "sqrtsoftplus"}, "scoring_func", '"sqrtsoftplus"'),
    ("DeepSeek-R1", {"topk_method": "device_limited"}, "topk_method", '"device_limited"'),
    ("Moonlight-16B-A3B", {"scoring_func": "softmax"}, "topk_method", '"noaux_tc"'),  # expert bias needs sigmoid
    ("DeepSeek-V3", {"moe_layer_freq": 2}, "moe_layer_freq", "2"),
    ("DeepSeek-V3", {"rope_interleave": False}, "rope_interleave", "false"),
    ("Moonlight-16B-A3B", {"rope_interleave": None}, "rope_interleave", "null"),
    ("DeepSeek-V3", {"norm_topk_prob": False}, "norm_topk_prob", "false"),
    ("Kimi-K2-Instruct", {"norm_topk_prob": False}, "norm_topk_prob", "false"),
    ("DeepSeek-V3", {"num_key_value_heads": 8}, "num_key_value_heads", "8"),
    # identity and spellings
    ("Llama-3.1-8B", {"model_type": "mistral"}, "model_type", '"mistral"'),
    ("Qwen3-30B-A3B", {"num_local_experts": 64}, "num_local_experts", "64"),
    ("DeepSeek-V3", {"num_mtp_layers": 0}, "num_mtp_layers", "0"),
    ("Qwen3-8B", {"hidden_size": ...}, "hidden_size", "missing"),  # ... deletes the key
]


def _changed(model: str, change: dict) -> dict:
    cfg = published(model)
    for k, v in change.items():
        if v is ...:
            del cfg[k]
        else:
            cfg[k] = v
    return cfg


@pytest.mark.parametrize("model,change,field,value", ERRORS,
                         ids=[f"{m}-{f}-{i}" for i, (m, _, f, _) in enumerate(ERRORS)])
def test_unsupported_value_is_one_line_naming_field_and_value(model, change, field, value):
    cfg = _changed(model, change)
    with pytest.raises(ConfigError) as err:
        family_for(cfg).read_config(cfg)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and value in msg, msg


def test_tied_embeddings_with_an_mtp_layer_are_refused_by_the_rules():
    cfg = _changed("DeepSeek-V3", {"tie_word_embeddings": True})
    fam = family_for(cfg)
    m = fam.read_config(cfg)  # without MTP (hf2mcore --mtp drop) the rules tie
    with pytest.raises(ConfigError) as err:
        fam.rules(m)
    assert "tie_word_embeddings=true" in str(err.value) and "\n" not in str(err.value)
    from convert.conversion_plan import without_mtp
    assert not any(r.mcore == "output_layer.weight" for r in fam.rules(without_mtp(m)))


OK = [  # supported variants: read without error
    ("DeepSeek-V2-Lite", {"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 4}),  # 6 // 4 == 1
    ("Qwen2.5-0.5B", {"use_sliding_window": True}),  # window 32768 == max_position_embeddings
    ("Qwen2.5-7B", QWEN_WINDOW),  # max_window_layers 28 of 28 layers: transformers 5 slides no layer
    ("Qwen3-8B", {**QWEN_WINDOW, "max_window_layers": 36, "layer_types": ["full_attention"] * 36}),
    ("Qwen3-8B", {"use_sliding_window": False, "sliding_window": 4096}),
    ("Qwen3-30B-A3B", {"use_sliding_window": True}),  # sliding_window null: no window
    ("Llama-3.1-8B", {"hidden_act": "swish"}),
    ("DeepSeek-V3", {"quantization_config": None}),
    ("Qwen3-8B", {"quantization_config": {**FP8, "modules_to_not_convert": ["lm_head"]}}),
    ("DeepSeek-V3", {"topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False}),
    ("DeepSeek-V3", {"rope_scaling": None, "rope_parameters": {"rope_theta": 10000, "rope_type": "default"}}),
]


@pytest.mark.parametrize("model,change", OK)
def test_supported_variants_read(model, change):
    cfg = _changed(model, change)
    family_for(cfg).read_config(cfg)


# --------------------------------------------------------------------------- (c) the published configs
@pytest.mark.parametrize("model", MODELS)
def test_published_config_reads_without_notes(model):
    """No unknown keys in any published config, and no routing caveat: DeepSeek-V3/R1 rank
    groups by top-2 in both Megatron-Core (8 // 4) and DeepSeek; Kimi-K2 and Moonlight have one group."""
    cfg = published(model)
    assert family_for(cfg).read_config(cfg).notes == ()


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_tiny_presets_read_without_notes(family):
    cfg = published_config(family)
    assert family_for(cfg).read_config(cfg).notes == ()


def test_unknown_extra_keys_are_a_note_not_an_error():
    cfg = _changed("Qwen3-8B", {"my_custom_flag": True, "another_one": 3})
    notes = family_for(cfg).read_config(cfg).notes
    assert len(notes) == 1 and "another_one, my_custom_flag" in notes[0] and "\n" not in notes[0]


def test_routing_caveats_stay_notes():
    cfg = _changed("DeepSeek-V3", {"topk_group": 2})  # Megatron-Core ranks groups by top-4, DeepSeek top-2
    assert any("group-limited routing differs" in n for n in family_for(cfg).read_config(cfg).notes)
    cfg = _changed("DeepSeek-V3", {"topk_method": "group_limited_greedy"})  # DeepSeek: the best expert
    m = family_for(cfg).read_config(cfg)
    assert any("by its top 1" in n for n in m.notes) and any("transformers" in n for n in m.notes)
    assert not m.transformer["moe_router_enable_expert_bias"]
    assert not any("expert_bias" in r.mcore for r in family_for(cfg).rules(m))


def test_softmax_routing_follows_norm_topk_prob():
    for norm in (True, False):
        cfg = _changed("Moonlight-16B-A3B", {"scoring_func": "softmax", "topk_method": "greedy",
                                             "norm_topk_prob": norm})
        t = family_for(cfg).read_config(cfg).transformer
        assert t["moe_router_pre_softmax"] is (not norm) and t["moe_router_num_groups"] is None
