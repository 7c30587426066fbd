"""Converted checkpoints load into the GPTModel Megatron-LM builds from its published flags.

``convert/megatron_lm.py`` builds the model the way Megatron-LM's pretrain_gpt.py does from MODEL_ARGS
text, with no knowledge of this project's ``mapping``. Here: that helper against facts from
Megatron-LM's arguments.py and published confs (fast), then each tiny family converted with
``python -m convert hf2mcore``, loaded strictly by that model and compared with transformers'
logits, in process at TP=1 and (multiproc) under torchrun at TP=2 / EP=2.

The flag texts are the MODEL_ARGS of ``examples/post_training/modelopt/conf/`` in Megatron-LM
(snapshot d98e8a6), with the sizes filled in from config.json (``with_sizes``) and the few flags a
user adds for the config the published conf gets wrong or cannot know (listed per family below).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import megatron_lm
from runtime import megatron as rt
from convert_helpers import consumer_logits_per_layout, fixed_tokens, transformers_logits
from runtime.megatron_lm import padded_vocab_size, parse_flags
from tools.shrink import with_sizes
from tools.make_tiny import cached_tiny
from tools.tiny_configs import published_config

ROOT = Path(__file__).resolve().parents[1]

LLAMA_3_2_1B_INSTRUCT = """
--save-interval 100000 --micro-batch-size 1 --bf16 --no-masked-softmax-fusion
--disable-bias-linear --use-rotary-position-embeddings --no-rope-fusion --no-position-embedding
--normalization RMSNorm --swiglu --num-layers 16 --hidden-size 2048 --ffn-hidden-size 8192
--num-attention-heads 32 --group-query-attention --num-query-groups 8 --seq-length 4096
--max-position-embeddings 8192 --tokenizer-type HuggingFaceTokenizer
--make-vocab-size-divisible-by 1 --use-mcore-models --rotary-percent 1.0 --rotary-base 500000
--use-rope-scaling
"""
QWEN2_5_7B_INSTRUCT = """
--save-interval 100000 --micro-batch-size 1 --bf16 --no-masked-softmax-fusion
--disable-bias-linear --add-qkv-bias --position-embedding-type rope --no-rope-fusion
--normalization RMSNorm --swiglu --num-layers 28 --hidden-size 3584 --ffn-hidden-size 18944
--num-attention-heads 28 --group-query-attention --num-query-groups 4 --kv-channels 128
--seq-length 4096 --max-position-embeddings 32768 --tokenizer-type HuggingFaceTokenizer
--padded-vocab-size 152064 --make-vocab-size-divisible-by 1 --use-mcore-models
--rotary-percent 1.0 --rotary-base 1000000 --no-bias-swiglu-fusion
--untie-embeddings-and-output-weights
"""
QWEN3_8B = """
--save-interval 100000 --micro-batch-size 1 --bf16 --no-masked-softmax-fusion
--disable-bias-linear --untie-embeddings-and-output-weights --position-embedding-type rope
--no-rope-fusion --normalization RMSNorm --swiglu --num-layers 36 --hidden-size 4096
--ffn-hidden-size 12288 --num-attention-heads 32 --group-query-attention --num-query-groups 8
--kv-channels 128 --qk-layernorm --seq-length 4096 --max-position-embeddings 40960
--tokenizer-type HuggingFaceTokenizer --make-vocab-size-divisible-by 1187 --use-mcore-models
--rotary-percent 1.0 --rotary-base 1000000 --no-bias-swiglu-fusion
"""
QWEN3_30B_A3B = """
--save-interval 100000 --micro-batch-size 1 --bf16 --no-masked-softmax-fusion
--disable-bias-linear --untie-embeddings-and-output-weights --position-embedding-type rope
--no-rope-fusion --normalization RMSNorm --swiglu --num-layers 48 --hidden-size 2048
--ffn-hidden-size 6144 --num-attention-heads 32 --group-query-attention --num-query-groups 4
--kv-channels 128 --qk-layernorm --num-experts 128 --moe-ffn-hidden-size 768 --moe-router-topk 8
--moe-router-dtype fp32 --moe-aux-loss-coeff 1e-3 --moe-token-dispatcher-type alltoall
--moe-router-load-balancing-type aux_loss --seq-length 4096 --max-position-embeddings 40960
--tokenizer-type HuggingFaceTokenizer --make-vocab-size-divisible-by 1187 --use-mcore-models
--rotary-percent 1.0 --rotary-base 1000000 --no-bias-swiglu-fusion --sequence-parallel
"""
DEEPSEEK_R1 = """
--save-interval 100000 --micro-batch-size 1 --bf16 --no-masked-softmax-fusion
--disable-bias-linear --untie-embeddings-and-output-weights --position-embedding-type rope
--no-rope-fusion --normalization RMSNorm --swiglu --num-layers 61 --hidden-size 7168
--ffn-hidden-size 18432 --num-attention-heads 128 --kv-channels 128 --multi-latent-attention
--kv-lora-rank 512 --v-head-dim 128 --q-lora-rank 1536 --qk-head-dim 128 --qk-layernorm
--qk-pos-emb-head-dim 64 --num-experts 256 --moe-layer-freq [0]*3+[1]*58
--moe-ffn-hidden-size 2048 --moe-router-dtype fp32 --moe-router-score-function sigmoid
--moe-router-bias-update-rate 1e-3 --moe-router-enable-expert-bias --moe-router-topk 8
--moe-router-num-groups 8 --moe-router-group-topk 4 --moe-router-pre-softmax
--moe-router-topk-scaling-factor 2.5 --moe-shared-expert-overlap
--moe-shared-expert-intermediate-size 2048 --moe-aux-loss-coeff 1e-4
--moe-router-load-balancing-type seq_aux_loss --moe-token-dispatcher-type alltoall
--moe-token-drop-policy probs --seq-length 4096 --max-position-embeddings 163840
--tokenizer-type HuggingFaceTokenizer --make-vocab-size-divisible-by 1280 --use-mcore-models
--rotary-base 10000 --rotary-percent 1.0
--rotary-scaling-factor 40 --mscale 1.0 --mscale-all-dim 1.0
--recompute-activations --moe-layer-recompute --sequence-parallel
"""
YARN_LINE = "--rotary-scaling-factor 40 --mscale 1.0 --mscale-all-dim 1.0"
# Every text adds --transformer-impl local: no Transformer Engine here (TE is Megatron-LM's default).
# The published Qwen and DeepSeek confs leave --norm-epsilon at 1e-5; these config.json say 1e-6.
FLAGS = {
    "llama": LLAMA_3_2_1B_INSTRUCT + "--rope-scaling-factor 32\n--transformer-impl local",
    "qwen2": QWEN2_5_7B_INSTRUCT + "--norm-epsilon 1e-6\n--transformer-impl local",
    "qwen3": QWEN3_8B + "--norm-epsilon 1e-6\n--transformer-impl local",
    "qwen3_moe": QWEN3_30B_A3B + "--norm-epsilon 1e-6\n--transformer-impl local",
    # rope_scaling null: plain rope instead of R1's yarn (MLA's default rope type)
    "deepseek_v3": DEEPSEEK_R1.replace(YARN_LINE, "--rope-type rope")
    + "--norm-epsilon 1e-6\n--transformer-impl local",
}
BASE = "--num-layers 61 --hidden-size 7168 --num-attention-heads 128 --max-position-embeddings 4096"


# --------------------------------------------------------------------------- the helper itself
def test_parse_flags_reads_moe_layer_freq_and_megatron_defaults():
    a = parse_flags(BASE + "\n--moe-layer-freq [0]*3+[1]*58")
    assert a.moe_layer_freq == [0] * 3 + [1] * 58
    b = parse_flags(BASE + " \\\n# a shell comment line\n--moe-layer-freq 1 \\\n")
    assert b.moe_layer_freq == 1 and type(b.moe_layer_freq) is int
    # defaults of megatron/training/arguments.py (and the TransformerConfig fields it turns into flags)
    assert (b.layernorm_epsilon, b.add_bias_linear, b.swiglu, b.untie_embeddings_and_output_weights,
            b.position_embedding_type, b.make_vocab_size_divisible_by, b.num_query_groups,
            b.rotary_base, b.rope_scaling_factor, b.kv_lora_rank, b.qk_head_dim, b.q_lora_rank,
            b.moe_router_topk, b.transformer_impl, b.hidden_dropout) == (
        1e-5, True, False, False, "learned_absolute", 128, 1, 10000, 8.0, 32, 128, None, 2,
        "transformer_engine", 0.1)
    # validate_args: SwiGLU ffn = 2/3 of 4h rounded down to 64, kv = h / heads, MoE ffn = ffn
    c = parse_flags(BASE + " --swiglu --disable-bias-linear --use-rotary-position-embeddings "
                           "--num-experts 8 --moe-aux-loss-coeff 1e-3")
    assert (c.ffn_hidden_size, c.kv_channels, c.moe_ffn_hidden_size) == (19072, 56, 19072)
    assert (c.position_embedding_type, c.add_qkv_bias, c.moe_aux_loss_coeff) == ("rope", False, 1e-3)
    # vocab: as given, else the tokenizer's size padded to divisor x TP
    assert padded_vocab_size(parse_flags(BASE + " --vocab-size 600"), tp=1) == 640
    assert padded_vocab_size(parse_flags(BASE + " --vocab-size 600"), tp=2) == 768
    assert padded_vocab_size(parse_flags(BASE + " --vocab-size 600 --padded-vocab-size 600"), tp=2) == 600


def test_parse_flags_rejects_what_it_does_not_know():
    with pytest.raises(ValueError, match="unknown flag --moe-layer-frq"):
        parse_flags(BASE + " --moe-layer-frq 1")
    with pytest.raises(ValueError, match="only digits"):
        parse_flags(BASE + " --moe-layer-freq [__import__('os')]")
    with pytest.raises(ValueError, match="--hidden-size is required"):
        parse_flags("--num-layers 2")


def test_with_sizes_on_deepseek_r1_flags():
    n = 6
    cfg = published_config("deepseek_v3", overrides={"first_k_dense_replace": 3, "num_hidden_layers": n})
    a = parse_flags(with_sizes(DEEPSEEK_R1, cfg))
    assert a.moe_layer_freq == [0] * 3 + [1] * (n - 3)
    assert (a.num_layers, a.hidden_size, a.ffn_hidden_size, a.num_experts, a.moe_ffn_hidden_size,
            a.moe_shared_expert_intermediate_size, a.moe_router_topk, a.moe_router_num_groups,
            a.moe_router_group_topk, a.q_lora_rank, a.kv_lora_rank, a.qk_head_dim,
            a.qk_pos_emb_head_dim, a.v_head_dim, a.padded_vocab_size) == (
        n, 256, 320, 8, 96, 96, 4, 2, 2, 192, 512, 64, 64, 64, 768)
    assert (a.rotary_scaling_factor, a.mscale_all_dim) == (40.0, 1.0)  # not sizes: unchanged
    moonlight = parse_flags(with_sizes(DEEPSEEK_R1, published_config("moonlight")))
    assert moonlight.q_lora_rank is None  # q_lora_rank null drops the flag
    assert moonlight.moe_layer_freq == [0] + [1] * 3


# --------------------------------------------------------------------------- converted tiny models
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (hf_dir, torch_dist dir), converted once per module with the CLI."""
    cache = {}

    def get(family):
        if family not in cache:
            hf = cached_tiny(family)
            out = tmp_path_factory.mktemp(family) / "mcore"
            subprocess.run([sys.executable, "-m", "convert", "hf2mcore", "--hf-dir", str(hf),
                            "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
            cache[family] = (hf, out / "release")
        return cache[family]
    yield get
    rt.destroy_distributed()


def _assert_close(family, got_BSV, ref_BSV):
    diff = (got_BSV - ref_BSV).abs().max().item()
    assert diff <= 1e-4 * max(1.0, ref_BSV.abs().max().item()), f"{family}: max |dlogit| = {diff}"


def _check_tp1(converted, family):
    hf, ckpt = converted(family)
    cfg = json.loads((hf / "config.json").read_text())
    args = parse_flags(with_sizes(FLAGS[family], cfg))
    model = megatron_lm.build_model(args)
    megatron_lm.load(model, ckpt)
    ids_BS = fixed_tokens(cfg["vocab_size"])
    got_BSV = megatron_lm.logits(model, ids_BS)[..., : cfg["vocab_size"]]
    _assert_close(family, got_BSV, transformers_logits(hf, ids_BS))
    return args


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "deepseek_v3"])
def test_megatron_lm_model_loads_conversion_tp1(converted, family):
    args = _check_tp1(converted, family)
    if family == "deepseek_v3":  # first layer dense, then MoE
        assert args.moe_layer_freq == [0, 1, 1, 1]


def test_megatron_lm_model_loads_all_moe_qwen3_moe_tp1(converted):
    """Every layer MoE, no --moe-layer-freq (1): Megatron-LM asks for the stacked layer layout."""
    args = _check_tp1(converted, "qwen3_moe")
    assert args.moe_layer_freq == 1


LAYOUTS = {(2, 1): list(FLAGS), (1, 2): ["deepseek_v3", "qwen3_moe"]}


@pytest.fixture(scope="module")
def torchrun_logits(converted, tmp_path_factory):
    """(tp, ep) -> {family: logits or the worker's error line}, one torchrun per layout."""
    def cases_for(tp, ep):
        return {f: dict(flags=FLAGS[f], config=converted(f)[0] / "config.json", ckpt=converted(f)[1])
                for f in LAYOUTS[tp, ep]}
    return consumer_logits_per_layout(cases_for, fixed_tokens(512), tmp_path_factory)


@pytest.mark.multiproc
@pytest.mark.parametrize("family,tp,ep", [(f, tp, ep) for (tp, ep), fs in LAYOUTS.items() for f in fs])
def test_megatron_lm_model_loads_conversion_torchrun(converted, torchrun_logits, family, tp, ep):
    got = torchrun_logits(tp, ep)[family]
    assert not isinstance(got, str), got
    hf, _ = converted(family)
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    ids_BS = fixed_tokens(512)
    _assert_close(family, got[..., :vocab], transformers_logits(hf, ids_BS))
