"""Tests for tools.make_tiny: fabricated checkpoints load in transformers, match the published layouts.

Independent peers: transformers' own loader (it fuses experts and reports missing/unexpected keys),
the raw safetensors header (parsed here by hand, not through the writer's bookkeeping), a blockwise
amax computed here for the fp8 scales, and the IEEE bound of e4m3 rounding for the dequantised values.
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kernels.fp8_reference import fp8_block_dequant_reference
from tools import make_tiny as mt
from tools import tiny_weights as tw
from tools.tiny_configs import FAMILIES, FP8_QUANTIZATION_CONFIG

ALL = sorted(FAMILIES)
DEEPSEEKS = ["deepseek_v3", "moonlight"]
# What DeepSeek's published FP8 checkpoints quantise (attention and MLP/expert projections).
FP8_NAME = re.compile(r"\.(self_attn\.(q|k|v|o|q_a|q_b|kv_b)_proj|self_attn\.kv_a_proj_with_mqa|"
                      r"(mlp|shared_experts|experts\.\d+)\.(gate|up|down)_proj)\.weight$")


@pytest.fixture(scope="session")
def plain(tmp_path_factory) -> dict[str, Path]:
    """Every family, fp32, seed 0."""
    root = tmp_path_factory.mktemp("plain")
    return {f: mt.make_tiny(f, root / f, dtype="fp32") for f in ALL}


@pytest.fixture(scope="session")
def fp8(tmp_path_factory) -> dict[str, Path]:
    """DeepSeek families in the fp8 layout (deepseek_v3 with its MTP layer), seed 0."""
    root = tmp_path_factory.mktemp("fp8")
    return {f: mt.make_tiny(f, root / f, dtype="bf16", fp8=True, mtp=(f == "deepseek_v3"))
            for f in DEEPSEEKS}


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, data bytes) straight from a safetensors file's header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return header, len(raw) - 8 - n


def headers(ckpt: Path) -> dict[str, dict]:
    """tensor name -> header entry plus its file, over every safetensors file of ``ckpt``."""
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        for name, entry in read_header(f)[0].items():
            assert name not in out, f"{name} stored twice"
            out[name] = {**entry, "file": f.name}
    return out


def load_file_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


# ---------------------------------------------------------------- transformers loads it

@pytest.mark.parametrize("family", ALL)
def test_transformers_loads_and_runs(plain, family):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(plain[family], output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, "keys transformers did not expect or missed"
    vocab = config(plain[family])["vocab_size"]
    ids_BT = torch.randint(5, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits_BTV = model(ids_BT).logits
    assert logits_BTV.shape == (2, 7, vocab)
    assert torch.isfinite(logits_BTV).all() and logits_BTV.std() > 0.1
    # Every loaded parameter equals what was written: transformers' own revert (what its
    # save_pretrained would write) of the loaded state gives back the files' tensors.
    from transformers.core_model_loading import revert_weight_conversion

    files = load_file_tensors(plain[family])
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    saved = revert_weight_conversion(model, state)
    assert sorted(saved) == sorted(n for n in files if not n.startswith(f"model.layers.{model.config.num_hidden_layers}."))
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, files[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", ALL)
def test_values_are_not_trivial(plain, family):
    """Norm gains, biases and the router bias must differ from their defaults (1, 0, 0)."""
    files = load_file_tensors(plain[family])
    norms = [t for n, t in files.items() if n.endswith("norm.weight")]
    assert norms and all(t.std() > 0.1 and (t - 1).abs().max() > 0.3 for t in norms)
    for name, t in files.items():
        if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
            assert t.abs().mean() > 0.03, name
        if name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32
    assert any(n.endswith("q_proj.bias") for n in files) == (family in ("qwen2", "qwen2_moe", "glm4_moe", "gpt_oss"))
    assert any(n.endswith("e_score_correction_bias") for n in files) == (family in (*DEEPSEEKS, "glm4_moe"))


# ---------------------------------------------------------------- index and files

@pytest.mark.parametrize("family", ALL)
def test_index_matches_files(plain, family):
    ckpt = plain[family]
    index = json.loads((ckpt / mt.INDEX_NAME).read_text())
    files = sorted(ckpt.glob("*.safetensors"))
    assert len(files) >= 2
    assert {f.name for f in files} == set(index["weight_map"].values())
    stored = headers(ckpt)
    assert set(stored) == set(index["weight_map"])
    assert all(index["weight_map"][n] == e["file"] for n, e in stored.items())
    assert index["metadata"]["total_size"] == sum(read_header(f)[1] for f in files)
    item = {"F32": 4, "BF16": 2, "F8_E4M3": 1}
    assert index["metadata"]["total_size"] == sum(
        math.prod(e["shape"]) * item[e["dtype"]] for e in stored.values())


def test_plan_moves_a_cut_between_weight_and_scale():
    """Here the byte-balanced cut falls before ``c``; the planner must move it inside the fp8 pair."""
    spec = lambda name, shape, fp8: tw.TensorSpec(name, shape, torch.float32, name, fp8)  # noqa: E731
    specs = [spec("a.weight", (128, 256), False), spec("b.q_proj.weight", (128, 128), True),
             spec("c.weight", (512, 256), False)]
    files = tw.plan_shards(specs, max_shard_bytes=2**30)
    names = [[name for name, _, _ in f] for f in files]
    assert names == [["a.weight", "b.q_proj.weight"], ["b.q_proj.weight_scale_inv", "c.weight"]]
    plain = tw.plan_shards([specs[0], specs[2]], max_shard_bytes=2**30)
    assert [[n for n, _, _ in f] for f in plain] == [["a.weight"], ["c.weight"]]


def test_many_small_shards_still_consistent(tmp_path):
    ckpt = mt.make_tiny("llama", tmp_path / "l", dtype="fp32", max_shard_bytes=2 * 2**20)
    index = json.loads((ckpt / mt.INDEX_NAME).read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 4 and len(files) == len(list(ckpt.glob("*.safetensors")))
    assert set(headers(ckpt)) == set(index["weight_map"])


# ---------------------------------------------------------------- published config fields

def test_published_config_fields(plain):
    llama = config(plain["llama"])
    assert llama["tie_word_embeddings"] is True and llama["rope_theta"] == 500000.0
    assert llama["rope_scaling"]["rope_type"] == "llama3"
    from transformers import AutoConfig  # reads the file with both spellings present
    assert AutoConfig.from_pretrained(plain["llama"]).rope_parameters["rope_type"] == "llama3"
    assert "lm_head.weight" not in headers(plain["llama"])
    assert config(plain["qwen2"])["rope_theta"] == 1e6
    assert any(n.endswith("self_attn.k_norm.weight") for n in headers(plain["qwen3"]))
    moe = config(plain["qwen3_moe"])
    assert moe["num_experts"] == moe["num_local_experts"] == 8
    assert moe["decoder_sparse_step"] == 1 and moe["mlp_only_layers"] == []
    for fam in DEEPSEEKS:
        c = config(plain[fam])
        assert (c["topk_method"], c["scoring_func"]) == ("noaux_tc", "sigmoid")
        assert c["first_k_dense_replace"] >= 1 and c["num_hidden_layers"] > c["first_k_dense_replace"]
        assert c["n_group"] == 1 or c["num_experts_per_tok"] // c["topk_group"] == 2
        assert c["kv_lora_rank"] + c["qk_rope_head_dim"] == 576
        assert c["num_nextn_predict_layers"] == 0 and "quantization_config" not in c
        for key in ("routed_scaling_factor", "n_shared_experts", "norm_topk_prob", "rope_theta"):
            assert key in c
    assert config(plain["moonlight"])["q_lora_rank"] is None
    assert any(n.endswith("self_attn.q_proj.weight") for n in headers(plain["moonlight"]))
    assert any(n.endswith("self_attn.q_a_proj.weight") for n in headers(plain["deepseek_v3"]))


@pytest.mark.parametrize("family", ALL)
def test_dims_fit_vllm_cpu_and_parallel_splits(plain, family):
    c = config(plain[family])
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    assert heads >= 2 and kv >= 2 and heads % kv == 0 and kv % 2 == 0
    assert c.get("head_dim") == 64 or c["hidden_size"] // heads == 64
    experts = c.get("num_experts") or c.get("n_routed_experts") or 2
    assert experts % 2 == 0 and c["intermediate_size"] % 2 == 0
    assert 2 <= c["num_hidden_layers"] <= 4 and 512 <= c["vocab_size"] <= 1024
    assert sum(f.stat().st_size for f in plain[family].glob("*.safetensors")) < 32 * 2**20


# ---------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("family", ALL)
def test_tokenizer_loads_round_trips_and_chats(plain, family):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(plain[family])
    c = config(plain[family])
    assert len(tok) == c["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
        (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"])
    text = "Let's think step by step: $\\frac{1}{2} + 3^{2}$ = \\boxed{9.5}, café 数学\n\nDone."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text.encode())  # merges do apply
    chat = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|begin_of_text|><|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    assert tok("<|im_start|>")["input_ids"] == [3]


def test_tokenizer_rejects_too_small_vocab():
    from tools.tiny_tokenizer import build_tokenizer
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer(200)


# ---------------------------------------------------------------- fp8 layout

@pytest.mark.parametrize("family", DEEPSEEKS)
def test_fp8_layout_is_deepseeks(plain, fp8, family):
    q, ref = headers(fp8[family]), headers(plain[family])
    mtp_prefix = f"model.layers.{config(plain[family])['num_hidden_layers']}."
    quantised = {n for n in ref if FP8_NAME.search(n)}
    assert quantised and set(q) - {n for n in q if n.startswith(mtp_prefix)} == \
        set(ref) | {n + "_scale_inv" for n in quantised}
    for name, e in q.items():
        if name.endswith("_scale_inv"):
            rows, cols = q[name[:-len("_scale_inv")]]["shape"]
            assert e["dtype"] == "F32" and e["shape"] == [-(-rows // 128), -(-cols // 128)], name
        elif FP8_NAME.search(name):
            assert e["dtype"] == "F8_E4M3" and name + "_scale_inv" in q, name
        elif name.endswith("e_score_correction_bias"):
            assert e["dtype"] == "F32"
        else:
            assert e["dtype"] == "BF16", name  # embeddings, lm_head, norms, router, eh_proj
    assert any(s % 128 for n in quantised for s in q[n]["shape"]), "no partial edge blocks"
    assert any(q[n]["file"] != q[n + "_scale_inv"]["file"] for n in quantised), \
        "every weight shares a file with its scale_inv"
    assert config(fp8[family])["quantization_config"] == FP8_QUANTIZATION_CONFIG


@pytest.mark.parametrize("family", DEEPSEEKS)
def test_fp8_dequantises_to_the_plain_weights(plain, fp8, family):
    got, ref = load_file_tensors(fp8[family]), load_file_tensors(plain[family])
    for name, w_MN in ref.items():
        if not FP8_NAME.search(name):
            torch.testing.assert_close(got[name].float(), w_MN.to(got[name].dtype).float(), msg=name)
            continue
        w_fp8_MN, scale_inv_mn = got[name], got[name + "_scale_inv"]
        assert w_fp8_MN.dtype == torch.float8_e4m3fn
        m, n = scale_inv_mn.shape
        for i in range(m):  # DeepSeek's scale: block amax / 448
            for j in range(n):
                block = w_MN[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                assert scale_inv_mn[i, j].item() == pytest.approx(block.abs().max().item() / 448,
                                                                  rel=1e-6)
        deq_MN = fp8_block_dequant_reference(w_fp8_MN, scale_inv_mn, out_dtype=torch.float32)
        s_MN = scale_inv_mn.repeat_interleave(128, 0).repeat_interleave(128, 1)[:w_MN.shape[0],
                                                                                :w_MN.shape[1]]
        # e4m3: 3 mantissa bits -> relative error <= 2^-4; subnormal spacing 2^-9 (x block scale).
        bound_MN = w_MN.abs() * 2**-4 + s_MN * 2**-10 + 1e-12
        assert ((deq_MN - w_MN).abs() <= bound_MN).all(), name
        assert (deq_MN - w_MN).norm() / w_MN.norm() < 0.05, name


def test_mtp_layer_has_published_names(plain, fp8):
    c = config(fp8["deepseek_v3"])
    assert c["num_nextn_predict_layers"] == 1
    n = c["num_hidden_layers"]
    q = headers(fp8["deepseek_v3"])
    mtp = {k[len(f"model.layers.{n}."):] for k in q if k.startswith(f"model.layers.{n}.")}
    last = {k[len(f"model.layers.{n - 1}."):] for k in q if k.startswith(f"model.layers.{n - 1}.")}
    extra = {"embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
             "shared_head.norm.weight", "shared_head.head.weight"}
    assert mtp == last | extra
    assert q[f"model.layers.{n}.eh_proj.weight"]["shape"] == [c["hidden_size"], 2 * c["hidden_size"]]
    assert q[f"model.layers.{n}.eh_proj.weight"]["dtype"] == "BF16"
    got = load_file_tensors(fp8["deepseek_v3"])
    assert torch.equal(got[f"model.layers.{n}.embed_tokens.weight"], got["model.embed_tokens.weight"])
    assert torch.equal(got[f"model.layers.{n}.shared_head.head.weight"], got["lm_head.weight"])


# ---------------------------------------------------------------- determinism, cache, CLI

@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_same_seed_same_bytes(fp8, plain, tmp_path, family):
    if family == "deepseek_v3":
        first, again = fp8[family], mt.make_tiny(family, tmp_path / "b", dtype="bf16", fp8=True, mtp=True)
    else:
        first, again = plain[family], mt.make_tiny(family, tmp_path / "b", dtype="fp32")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    other = mt.make_tiny(family, tmp_path / "c", dtype="fp32", seed=1)
    assert (other / "config.json").read_bytes() == (plain[family] / "config.json").read_bytes()
    first_shard = sorted(other.glob("*.safetensors"))[0]
    assert first_shard.read_bytes() != (plain[family] / first_shard.name).read_bytes()


def test_cached_tiny_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_CACHE", str(tmp_path / "cache"))
    path = mt.cached_tiny("qwen3", dtype="fp32")
    assert path.parent == tmp_path / "cache" and (path / mt.INDEX_NAME).exists()
    monkeypatch.setattr(mt, "make_tiny", lambda *a, **k: pytest.fail("rebuilt a cached model"))
    assert mt.cached_tiny("qwen3", dtype="fp32") == path
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temp folders left


def test_overrides_and_errors(tmp_path):
    ckpt = mt.make_tiny("qwen2", tmp_path / "q", dtype="fp32", num_hidden_layers=2, vocab_size=300)
    assert config(ckpt)["num_hidden_layers"] == 2 and config(ckpt)["vocab_size"] == 300
    assert not any(".layers.2." in n for n in headers(ckpt))
    with pytest.raises(FileExistsError, match="not empty"):
        mt.make_tiny("qwen2", ckpt)
    with pytest.raises(KeyError, match="no 'small' preset"):
        mt.make_tiny("llama", tmp_path / "x", size="small")
    with pytest.raises(KeyError, match="unknown family"):
        mt.make_tiny("gpt2", tmp_path / "y")
    with pytest.raises(ValueError, match="publishes no MTP"):
        mt.make_tiny("qwen2", tmp_path / "z", mtp=True)


def test_cli_help_and_summary(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mt.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f in text for f in ALL) and "small" in text and "index.json" in text
    assert mt.main(["--family", "llama", "--out", str(tmp_path / "l"), "--num-layers", "2",
                    "--set", "intermediate_size=256"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "tensors in 2 files" in summary[0] and str(tmp_path / "l") in summary[0]
    assert config(tmp_path / "l")["intermediate_size"] == 256
