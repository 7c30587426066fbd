"""A model family: how to read its config.json and which rules map its tensors.

``Family.read_config(hf_config: dict) -> ModelConfig`` translates the HF config into what
Megatron-Core needs (``TransformerConfig`` keyword arguments and ``GPTModel`` arguments),
``Family.write_config(model_config) -> dict`` translates back (a config.json transformers and
vLLM load, e.g. for a model trained from a ``TransformerConfig`` alone) and
``Family.rules(model_config) -> list[Rule]`` lists the tensor rules for that concrete config
(e.g. no ``output_layer`` rule when embeddings are tied). ``read_config`` is strict: every field
of config.json is translated, checked or known irrelevant (``Family.fields``, see
``mapping/config_fields.py``), and a value Megatron-Core cannot express is a ``ConfigError``.
All are plain data builders: nothing here reads tensors, opens files or talks to other ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

from mapping.rules import Rule, Shapes

MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


class ConfigError(ValueError):
    """config.json cannot be translated (unknown architecture, missing or unsupported field)."""


def padded_vocab(vocab_size: int, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """Megatron pads embedding rows to a multiple; TP sizes dividing ``divisible_by`` all load it."""
    return -(-vocab_size // divisible_by) * divisible_by


@dataclass(frozen=True)
class ModelConfig:
    """Everything conversion, validation and the trainer need to build the MCore model."""
    family: str
    transformer: dict            # TransformerConfig / MLATransformerConfig keyword arguments
    mla: bool                    # build an MLATransformerConfig
    num_layers: int
    num_experts: int             # 0 for dense models
    moe_layers: tuple[int, ...]  # layer indices with a MoE MLP
    vocab_size: int
    padded_vocab_size: int
    max_position_embeddings: int
    tie_embeddings: bool
    rope: dict                   # GPTModel rope keyword arguments
    shapes: Shapes
    hf_dtype: str                # torch_dtype of the HF checkpoint ("bfloat16", "float32", ...)
    notes: tuple[str, ...] = field(default=())  # equivalence caveats, unknown config.json keys: print them

    def gpt_model_kwargs(self) -> dict:
        return dict(vocab_size=self.padded_vocab_size, max_sequence_length=self.max_position_embeddings,
                    rope=self.rope, tie_embeddings=self.tie_embeddings)


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    read_config: Callable[[dict], ModelConfig]
    rules: Callable[[ModelConfig], list[Rule]]
    write_config: Callable[[ModelConfig], dict]
    description: str = ""
    # Decides between families sharing an architecture name (Moonlight vs DeepSeek-V3).
    matches: Callable[[dict], bool] = lambda cfg: True
    # config.json field -> mapping.config_fields.Field: how read_config treats it (translated,
    # checked or irrelevant); tests/test_config_strict.py holds it against transformers' class.
    fields: Mapping[str, object] = field(default_factory=dict)
    # Adjusts Megatron-Core's decoder block spec for what the family's layers need beyond the
    # stock GPT layer (attention sinks, a sliding-window pattern, extra norms): ``fn(spec, config)
    # -> spec``, or its ``"module:function"`` name when the function lives above mapping/ (runtime/);
    # every model builder (conversion planning, validate, the trainer) applies it.
    layer_spec: Union[str, Callable[[object, object], object], None] = None
    # The TransformerConfig subclass to build, when the family's layer modules read settings
    # Megatron-Core has no field for (Gemma 3's second rope base): its ``"module:Class"`` name, imported
    # where the config is built, so mapping/ imports no Megatron-Core. None: TransformerConfig (MLA: MLATransformerConfig).
    config_class: Optional[str] = None
    # What Megatron-LM's pretrain_gpt.py flags cannot express for this family ("" = nothing): validate
    # then leaves out its Megatron-LM consumer stage (saying why) unless given --megatron-args, and the
    # zoo compares the model this family's layer spec builds, as Megatron-Bridge builds it.
    megatron_lm_gap: str = ""
    # Published checkpoints of this family that tests/test_zoo.py converts (hub repository names).
    published: tuple[str, ...] = ()
    # HF tensors the family's published FP8 checkpoints store block-quantised (a regex on the name;
    # "" = no published FP8 layout): what ``mcore2hf --dtype fp8`` quantises, the rest stays bf16.
    fp8_weights: str = ""

