"""Strict config.json reading: every field a family knows is translated, checked or irrelevant.

A family declares its config.json fields as data, a dict ``name -> Field`` of one of three kinds:

* translated: read into the ``ModelConfig`` / ``TransformerConfig``. ``default`` is the meaning of
  an absent key (transformers' class default, or the checkpoint's remote-code default for fields
  the class lacks); ``ok`` may restrict the values Megatron-Core can express;
* checked: every accepted value gives the same model, anything else is refused (``ok``);
* irrelevant: cannot change the weights or the eval forward (token ids, dropout, cache flags...).

``read_fields`` runs the checks, raising ``ConfigError`` in one line that names the field, its
value, what is supported and what to do, and returns a ``Reader``: ``get(name)`` is the meaning
of a field (default applied; several spellings of one field, e.g. ``num_experts`` and
transformers 5's ``num_local_experts``, must agree). Keys no table knows are not an error
(transformers keeps them as inert attributes); they are listed in one note.

Without this module a config.json asking for something Megatron-Core cannot express (a sliding
window, another rope scaling, biased projections) converted silently into a model that computes
something else. What is left to the family files: their tables and how translated values become
``TransformerConfig`` arguments; ``tests/test_config_strict.py`` holds the tables against the
installed transformers classes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from mapping.family import ConfigError

TRANSLATED, CHECKED, IRRELEVANT = "translated", "checked", "irrelevant"
KINDS = (TRANSLATED, CHECKED, IRRELEVANT)


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()  # no default: config.json must carry the field


@dataclass(frozen=True)
class Derived:
    """A default computed from other fields: ``fn(get)``."""
    fn: Callable[["Reader"], Any]


@dataclass(frozen=True)
class Field:
    """How one config.json field is read."""
    kind: str
    """translated, checked or irrelevant."""
    default: Any = None
    """Meaning of an absent key (``REQUIRED``: none; ``Derived``: computed from other fields)."""
    if_null: Any = None
    """Meaning of an explicit null (None keeps null; ``Derived`` as for ``default``)."""
    ok: Optional[Callable[[Any, "Reader"], bool]] = None
    """Supported values: ``ok(meaning, get)``; None accepts every value."""
    supported: Any = ""
    """What is supported (text, or ``fn(get) -> text``), for the error message."""
    fix: str = ""
    """What the user can do, for the error message."""
    same_as: Optional[str] = None
    """This key is another spelling of that field (read and checked together with it)."""
    meaning: Optional[Callable[["Reader"], Any]] = None
    """A composite field (rope): its meaning computed from the whole config."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"field kind must be one of {KINDS}, got {self.kind!r}")


def translated(default: Any = REQUIRED, **kw) -> Field:
    return Field(TRANSLATED, default, **kw)


def checked(default: Any, ok: Callable[[Any, "Reader"], bool], supported: Any, fix: str, **kw) -> Field:
    return Field(CHECKED, default, ok=ok, supported=supported, fix=fix, **kw)


def must_be(value: Any, fix: str, supported: str = "", **kw) -> Field:
    """A checked field with one supported value, which is also its default."""
    return checked(value, lambda v, get: canon(v) == canon(value), supported or show(value), fix, **kw)


def irrelevant(*names: str) -> dict[str, Field]:
    return {n: Field(IRRELEVANT) for n in names}


def spelling(of: str) -> Field:
    """Another key for field ``of`` (its kind is that field's)."""
    return Field(TRANSLATED, same_as=of)


def canon(value: Any) -> Any:
    """JSON values compared by meaning: 10000 == 10000.0, tuples == lists."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (list, tuple)):
        return [canon(v) for v in value]
    if isinstance(value, Mapping):
        return {k: canon(v) for k, v in value.items()}
    return value


def show(value: Any) -> str:
    """A value as config.json spells it, on one line."""
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError:
        return repr(value).replace("\n", " ")


def refuse(family: str, name: str, value: Any, supported: str, fix: str) -> ConfigError:
    """The one-line error for a value this converter cannot honour."""
    return ConfigError(f"config.json {name}={show(value)}: {family} supports {supported}; {fix}")


class Reader:
    """The meaning of each field of one config.json: ``get(name)``; ``get.notes``, ``get.family``."""

    def __init__(self, fields: Mapping[str, Field], family: str, cfg: dict):
        self.fields, self.family, self.cfg = fields, family, cfg
        unknown = sorted(k for k in cfg if k not in fields)
        self.notes: tuple[str, ...] = (
            (f"config.json fields unknown to the {family} translation, left unread (check they do not "
             f"change the model): {', '.join(unknown)}",) if unknown else ())

    def spellings(self, name: str) -> list[str]:
        primary = self.fields[name].same_as or name
        return [primary] + [n for n, f in self.fields.items() if f.same_as == primary]

    def __call__(self, name: str) -> Any:
        primary = self.fields[name].same_as or name
        f = self.fields[primary]
        if f.meaning is not None:
            return f.meaning(self)
        present = [n for n in self.spellings(primary) if n in self.cfg]
        values = {n: self.cfg[n] for n in present}
        if len({show(canon(v)) for v in values.values()}) > 1:
            a, b = present[:2]
            raise ConfigError(f"config.json {a}={show(values[a])} and {b}={show(values[b])} are two spellings "
                              f"of one field and disagree; keep one of them")
        if not present:
            if f.default is REQUIRED:
                raise ConfigError(f"config.json: field {primary!r} is required for {self.family} and missing; "
                                  "add it (see the model's published config.json)")
            return self._resolve(f.default)
        value = values[present[0]]
        return self._resolve(f.if_null) if value is None and f.if_null is not None else value

    def _resolve(self, default: Any) -> Any:
        return default.fn(self) if isinstance(default, Derived) else default


def read_fields(fields: Mapping[str, Field], family: str, cfg: dict) -> Reader:
    """Check ``cfg`` against ``fields`` (``ConfigError`` on the first unsupported value) and
    return its ``Reader``."""
    get = Reader(fields, family, cfg)
    for name, f in fields.items():
        if f.same_as is not None:
            continue
        value = get(name)
        if f.ok is not None and not f.ok(value, get):
            supported = f.supported(get) if callable(f.supported) else f.supported
            shown = next((n for n in get.spellings(name) if n in cfg), name)
            raise refuse(family, shown, value, supported, f.fix)
    return get


def by_kind(fields: Mapping[str, Field]) -> dict[str, list[str]]:
    """Field names per kind (spellings count as their field's kind)."""
    out: dict[str, list[str]] = {k: [] for k in KINDS}
    for name, f in fields.items():
        out[fields[f.same_as].kind if f.same_as else f.kind].append(name)
    return out


# ---------------------------------------------------------------- shared tables

BASE = {
    **irrelevant(
        # PretrainedConfig fields transformers 5 writes into every config.json
        "transformers_version", "_name_or_path", "output_hidden_states", "output_attentions", "return_dict",
        "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
        # every causal-LM class here: generation, caching, init and training-only knobs
        "use_cache", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
        "auto_map",  # names the checkpoint's remote code; the family decides what it computes
        # generation and pipeline defaults transformers 4 wrote into config.json (forward unaffected)
        "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
        "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
        "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
        "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
        "suppress_tokens", "begin_suppress_tokens", "decoder_start_token_id", "sep_token_id",
        "torchscript", "use_bfloat16", "tf_legacy_loss", "finetuning_task", "prefix",
        "task_specific_params", "tokenizer_class", "_attn_implementation_autoset"),
    "torch_dtype": translated("float32"),
    "dtype": spelling("torch_dtype"),
    "tie_word_embeddings": translated(False),
    "vocab_size": translated(),
    "hidden_size": translated(),
    "intermediate_size": translated(),
    "num_hidden_layers": translated(),
    "num_attention_heads": translated(),
    "rms_norm_eps": translated(1e-6),
    "hidden_act": checked("silu", lambda v, get: v in ("silu", "swish"), "silu (SwiGLU; swish is the same function)",
                          "Megatron-Core is built here with a SiLU-gated MLP only; this model cannot be converted"),
}

FP8_BLOCK = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
FP8_OPTIONAL = ("modules_to_not_convert", "ignored_layers")  # unquantised modules: plain tensors, read as-is


def _fp8_block(v, get) -> bool:
    if v is None:
        return True
    core = {k: x for k, x in v.items() if k not in FP8_OPTIONAL} if isinstance(v, Mapping) else v
    return canon(core) == canon(FP8_BLOCK)


QUANTIZATION = {"quantization_config": checked(
    None, _fp8_block, f"none or DeepSeek's FP8 block format {show(FP8_BLOCK)}",
    "dequantise the checkpoint to bf16 first (and drop quantization_config), or add its format to "
    "convert/hf_checkpoint.py")}


def identity(family: str, architecture: str, model_types: tuple[str, ...]) -> dict[str, Field]:
    """``architectures`` and ``model_type``: which transformers class reads this config."""
    return {
        "architectures": checked(None, lambda v, get: architecture in (v or ()), architecture,
                                 "pick the family by its architecture (mapping/registry.py)"),
        "model_type": checked(REQUIRED, lambda v, get: v in model_types, " or ".join(model_types),
                              f"transformers would read this config with another class than {family}'s; "
                              f"fix model_type or add a family"),
    }


# ---------------------------------------------------------------- rope

@dataclass(frozen=True)
class Fixed:
    """A rope parameter Megatron-Core hard-codes: it must equal ``value`` (absent allowed unless
    ``required``)."""
    value: Any
    required: bool = False


ANY_ROPE = {"partial_rotary_factor": Fixed(1.0)}  # Megatron-Core rotates the whole head here


def _rope_type(s: dict, where: str, family: str) -> str:
    kinds = {s[k] for k in ("rope_type", "type") if k in s}
    if len(kinds) > 1:
        raise refuse(family, where + ".type", s["type"], f"the same value as {where}.rope_type", "keep one of them")
    return kinds.pop() if kinds else "default"


def _scaling(s: Any, where: str, family: str) -> dict:
    """A scaling dict with its type under ``rope_type`` (either spelling); {} for plain rope."""
    if not s:
        return {}
    if not isinstance(s, Mapping):
        raise refuse(family, where, s, "a dict of rope parameters or null", f"fix {where}")
    kind = _rope_type(s, where, family)
    return {} if kind == "default" and set(s) <= {"rope_type", "type"} else {
        "rope_type": kind, **{k: v for k, v in s.items() if k not in ("rope_type", "type")}}


def _rope_source(get: Reader) -> tuple[float, str, dict]:
    """(theta, the key holding the scaling, the scaling dict) from either vintage of config.json;
    both spellings present must agree."""
    cfg, family = get.cfg, get.family
    params = cfg.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise refuse(family, "rope_parameters", params, "one dict of rope parameters or null", "fix rope_parameters")
    top, nested = cfg.get("rope_theta"), params.get("rope_theta")
    if top is not None and nested is not None and float(top) != float(nested):
        raise ConfigError(f"config.json rope_theta={show(top)} and rope_parameters.rope_theta={show(nested)} "
                          "disagree; keep one of them")
    theta = next((float(t) for t in (top, nested) if t is not None), None)
    old = _scaling(cfg.get("rope_scaling"), "rope_scaling", family)
    new = _scaling({k: v for k, v in params.items() if k != "rope_theta"}, "rope_parameters", family)
    if old and new and canon(old) != canon(new):
        raise ConfigError(f"config.json rope_scaling={show(cfg['rope_scaling'])} and rope_parameters="
                          f"{show(params)} disagree; keep one of them")
    return theta, "rope_scaling" if old else "rope_parameters", old or new


def rope_meaning(kinds: Mapping[str, Mapping[str, Any]], default_theta: float = 10000.0):
    """The meaning of ``rope_theta`` / ``rope_scaling`` / ``rope_parameters`` (published configs
    use the first two, transformers 5 the third): ``{"rope_type", "rope_theta", <parameters>}`` with
    defaults applied. ``kinds``: rope type -> parameter -> default (``REQUIRED``, ``Fixed``)."""
    def meaning(get: Reader) -> dict:
        theta, where, scaling = _rope_source(get)
        family, kind = get.family, scaling.get("rope_type", "default")
        if kind not in kinds:
            names = " or ".join("none" if k == "default" else k for k in kinds)
            spelled = "rope_type" if "rope_type" in (get.cfg.get(where) or {}) else "type"
            raise refuse(family, f"{where}.{spelled}", kind, f"rope scaling {names} (what Megatron-Core "
                         "expresses for this architecture)", "this model cannot be converted")
        out = {"rope_type": kind, "rope_theta": default_theta if theta is None else theta}
        spec = {**ANY_ROPE, **kinds[kind]}
        for key, value in scaling.items():
            if key != "rope_type" and key not in spec:
                raise refuse(family, f"{where}.{key}", value, f"{kind} rope parameters {', '.join(spec)}",
                             "Megatron-Core has no such rope parameter; this model cannot be converted")
        for key, default in spec.items():
            value = scaling.get(key)
            if isinstance(default, Fixed):
                if (value is None and default.required) or (value is not None and canon(value) != canon(default.value)):
                    own = {k: d for k, d in kinds[kind].items() if isinstance(d, Fixed)}
                    fixed = ", ".join(f"{k}={show(d.value)}" if d.value is not None else f"no {k}"
                                      for k, d in {**own, key: default}.items())
                    raise refuse(family, f"{where}.{key}", value, f"{kind} rope with {fixed}",
                                 "Megatron-Core hard-codes these; this model cannot be converted")
            elif value is None and default is REQUIRED:
                raise refuse(family, f"{where}.{key}", None, f"{kind} rope with {key} set", f"add {where}.{key}")
            else:
                out[key] = float(default if value is None else value)
        return out
    return meaning


def rope_fields(kinds: Mapping[str, Mapping[str, Any]]) -> dict[str, Field]:
    meaning = rope_meaning(kinds)
    return {name: translated(meaning=meaning) for name in ("rope_theta", "rope_scaling", "rope_parameters")}
