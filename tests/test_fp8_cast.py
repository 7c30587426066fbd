"""tools.fp8_cast_bf16 on hand-built FP8 checkpoints: content, index, config, errors, ranks.

The hand-built checkpoint has a weight whose scale lives in another shard, a shard holding only
the MTP layer, partial 128-blocks, non-FP8 tensors of several dtypes, tokenizer files and a
sub-folder. Expected outputs come from ``kernels.fp8_reference`` and the input bytes, never
from the tool itself. The fabricated DeepSeek-V3 (tools.make_tiny) test checks transformers
loads the cast and gives the logits of the reference-dequantised model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kernels.fp8_reference import fp8_block_dequant_reference, fp8_block_quant_reference
from tools.fp8_cast_bf16 import TMP_SUFFIX, main

REPO = Path(__file__).resolve().parents[1]
PY = Path(sys.executable)  # the interpreter running the tests (the project venv under make test)
INDEX = "model.safetensors.index.json"
QCFG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def _fp8(g, shape):
    return fp8_block_quant_reference((torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))


def build_fp8_checkpoint(root: Path, *, single_file: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """A 2-layer DeepSeek-like FP8 checkpoint (+ MTP layer 2); returns {file: {name: tensor}}."""
    g = torch.Generator().manual_seed(0)
    q0, q0s = _fp8(g, (200, 300))
    d0, d0s = _fp8(g, (129, 257))
    m2, m2s = _fp8(g, (64, 64))
    shards = {
        "model-00001-of-00003.safetensors": {
            "model.embed_tokens.weight": torch.randn(50, 64, generator=g).to(torch.bfloat16),
            "model.layers.0.self_attn.q_proj.weight": q0,  # its scale is in shard 2
            "model.layers.0.input_layernorm.weight": torch.rand(64, generator=g).to(torch.bfloat16),
            "model.layers.1.mlp.gate.e_score_correction_bias": torch.randn(8, generator=g),
        },
        "model-00002-of-00003.safetensors": {
            "model.layers.0.self_attn.q_proj.weight_scale_inv": q0s,
            "model.layers.1.mlp.down_proj.weight": d0,
            "model.layers.1.mlp.down_proj.weight_scale_inv": d0s,
            "model.norm.weight": torch.rand(64, generator=g).to(torch.bfloat16),
            "lm_head.weight": torch.randn(50, 64, generator=g).to(torch.bfloat16),
        },
        "model-00003-of-00003.safetensors": {  # the MTP layer (index num_hidden_layers = 2) only
            "model.layers.2.eh_proj.weight": torch.randn(64, 128, generator=g).to(torch.bfloat16),
            "model.layers.2.mlp.up_proj.weight": m2,
            "model.layers.2.mlp.up_proj.weight_scale_inv": m2s,
        },
    }
    if single_file:
        shards = {"model.safetensors": {k: v for s in shards.values() for k, v in s.items()}}
    root.mkdir(parents=True)
    for fname, tensors in shards.items():
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
    if not single_file:
        wm = {n: f for f, ts in shards.items() for n in ts}
        total = sum(t.numel() * t.element_size() for ts in shards.values() for t in ts.values())
        (root / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_hidden_layers": 2,
              "num_nextn_predict_layers": 1, "hidden_size": 64, "quantization_config": QCFG}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (root / "generation_config.json").write_text('{"bos_token_id": 0}')
    (root / "figures").mkdir()
    (root / "figures" / "plot.bin").write_bytes(bytes(range(256)))
    return shards


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def expected_tensors(shards, drop_mtp=False) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for fname, tensors in shards.items():
        kept = {}
        for name, t in tensors.items():
            if name.endswith("_scale_inv") or (drop_mtp and name.startswith("model.layers.2.")):
                continue
            scale = next((s[name + "_scale_inv"] for s in shards.values() if name + "_scale_inv" in s), None)
            kept[name] = t if scale is None else fp8_block_dequant_reference(t, scale)
        if kept:
            out[fname] = kept
    return out


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]):
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


@pytest.fixture()
def fp8_ckpt(tmp_path):
    shards = build_fp8_checkpoint(tmp_path / "in")
    return tmp_path / "in", shards


def test_cast_writes_bf16_shards_index_config_and_other_files(fp8_ckpt, tmp_path, capsys):
    src, shards = fp8_ckpt
    before = tree_digest(src)
    assert main(["--in", str(src), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    want = expected_tensors(shards)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(want)
    for fname, tensors in want.items():
        assert_same_tensors(load_file(str(out / fname)), tensors)
    index = json.loads((out / INDEX).read_text())
    assert index["weight_map"] == {n: f for f, ts in want.items() for n in ts}
    assert not any(n.endswith("_scale_inv") for n in index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for ts in want.values() for t in ts.values())
    config = json.loads((out / "config.json").read_text())
    src_config = json.loads((src / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == {k: v for k, v in src_config.items() if k != "quantization_config"}
    for rel in ["tokenizer.json", "generation_config.json", "figures/plot.bin"]:
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    assert tree_digest(src) == before  # input untouched
    assert not out.with_name(out.name + TMP_SUFFIX).exists()
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("fp8_cast_bf16: wrote 3 files, 9 tensors (3 dequantised")


def test_drop_mtp_removes_layer_and_empty_shard(fp8_ckpt, tmp_path):
    src, shards = fp8_ckpt
    out = tmp_path / "out"
    assert main(["--in", str(src), "--out", str(out), "--drop-mtp"]) == 0
    want = expected_tensors(shards, drop_mtp=True)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(want) and len(want) == 2
    for fname, tensors in want.items():
        assert_same_tensors(load_file(str(out / fname)), tensors)
    index = json.loads((out / INDEX).read_text())
    assert not any(n.startswith("model.layers.2.") for n in index["weight_map"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and "quantization_config" not in config


def test_single_file_checkpoint(tmp_path):
    shards = build_fp8_checkpoint(tmp_path / "in", single_file=True)
    assert main(["--in", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["config.json", "figures", "generation_config.json", "model.safetensors", "tokenizer.json"])
    assert_same_tensors(load_file(str(tmp_path / "out" / "model.safetensors")), expected_tensors(shards)["model.safetensors"])
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def _resave(path: Path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _drop_from_index(root: Path, name: str):
    index = json.loads((root / INDEX).read_text())
    del index["weight_map"][name]
    (root / INDEX).write_text(json.dumps(index))


def _break_missing_scale(root):
    _resave(root / "model-00002-of-00003.safetensors", lambda t: t.pop("model.layers.1.mlp.down_proj.weight_scale_inv"))
    _drop_from_index(root, "model.layers.1.mlp.down_proj.weight_scale_inv")


def _break_scale_shape(root):
    _resave(root / "model-00002-of-00003.safetensors",
            lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(2, 2)}))


def _break_orphan_scale(root):
    _resave(root / "model-00001-of-00003.safetensors", lambda t: t.pop("model.layers.0.self_attn.q_proj.weight"))
    _drop_from_index(root, "model.layers.0.self_attn.q_proj.weight")


BROKEN = {
    "weight without scale": (_break_missing_scale, "model.layers.1.mlp.down_proj.weight"),
    "scale of wrong shape": (_break_scale_shape, "model.layers.0.self_attn.q_proj.weight_scale_inv"),
    "scale without weight": (_break_orphan_scale, "model.layers.0.self_attn.q_proj.weight_scale_inv"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_fails_before_writing(case, fp8_ckpt, tmp_path, capsys):
    src, _ = fp8_ckpt
    BROKEN[case][0](src)
    before = tree_digest(src)
    out = tmp_path / "out"
    assert main(["--in", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fp8_cast_bf16: error: ") and BROKEN[case][1] in err[0], err
    assert tree_digest(src) == before
    assert not out.exists() and not out.with_name(out.name + TMP_SUFFIX).exists()


def test_output_location_errors_and_overwrite(fp8_ckpt, tmp_path, capsys):
    src, shards = fp8_ckpt
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--in", str(src), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["--in", str(src), "--out", str(src)]) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert main(["--in", str(src), "--out", str(src / "bf16")]) == 2
    assert "nested" in capsys.readouterr().err and not (src / "bf16").exists()
    assert main(["--in", str(src), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    assert_same_tensors(load_file(str(out / "model-00002-of-00003.safetensors")),
                        expected_tensors(shards)["model-00002-of-00003.safetensors"])


def test_cli_module_entry_point(fp8_ckpt, tmp_path):
    src, _ = fp8_ckpt
    proc = subprocess.run([str(PY), "-m", "tools.fp8_cast_bf16", "--in", str(src), "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("fp8_cast_bf16: wrote 3 files")
    help_text = subprocess.run([str(PY), "-m", "tools.fp8_cast_bf16", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=60).stdout
    assert "--drop-mtp" in help_text and "mpiexec -n" in help_text


@pytest.mark.multiproc
@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_two_ranks_byte_identical_to_one(launcher, fp8_ckpt, tmp_path):
    src, _ = fp8_ckpt
    assert main(["--in", str(src), "--out", str(tmp_path / "one")]) == 0
    from runtime.net import free_port

    bin_dir = PY.parent
    cmd = ([str(bin_dir / "mpiexec"), "-n", "2", str(PY), "-m"] if launcher == "mpiexec"
           else [str(bin_dir / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + ["tools.fp8_cast_bf16", "--in", str(src), "--out", str(tmp_path / "two")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "on 2 rank(s)" in proc.stdout
    assert tree_digest(tmp_path / "two") == tree_digest(tmp_path / "one")


@pytest.mark.multiproc
def test_two_ranks_refuse_a_broken_checkpoint_without_hanging(fp8_ckpt, tmp_path):
    src, _ = fp8_ckpt
    _break_scale_shape(src)
    cmd = [str(PY.parent / "mpiexec"), "-n", "2", str(PY), "-m", "tools.fp8_cast_bf16",
           "--in", str(src), "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("fp8_cast_bf16: error: ") == 1 and "q_proj.weight_scale_inv" in proc.stderr
    assert not (tmp_path / "two").exists() and not (tmp_path / ("two" + TMP_SUFFIX)).exists()


@pytest.mark.slow  # ~13 s: transformers import and two model loads
def test_fabricated_deepseek_v3_loads_in_transformers_with_reference_logits(tmp_path):
    """Cast the make_tiny FP8 DeepSeek-V3; transformers loads it; logits equal the reference's."""
    make_tiny = pytest.importorskip("tools.make_tiny")
    from transformers import AutoModelForCausalLM
    src = make_tiny.cached_tiny("deepseek_v3", dtype="bf16", fp8=True, mtp=True)
    out = tmp_path / "bf16"
    assert main(["--in", str(src), "--out", str(out), "--drop-mtp"]) == 0
    # the same checkpoint dequantised by the plain reference, written with safetensors' own writer
    ref = tmp_path / "ref"
    shutil.copytree(src, ref, ignore=shutil.ignore_patterns("*.safetensors", INDEX))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    ref_state = {n: (fp8_block_dequant_reference(t, tensors[n + "_scale_inv"]) if n + "_scale_inv" in tensors else t)
                 for n, t in tensors.items() if not n.endswith("_scale_inv")}
    save_file(ref_state, str(ref / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ref / "config.json").read_text())
    cfg.pop("quantization_config")
    (ref / "config.json").write_text(json.dumps(cfg))

    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 11]])
    logits = {}
    for name, path in [("cast", out), ("reference", ref)]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(ids).logits
    assert torch.isfinite(logits["cast"]).all()
    assert torch.equal(logits["cast"], logits["reference"])
    n_fp8 = sum(1 for n in tensors if n.endswith("_scale_inv"))
    assert n_fp8 > 0 and not any(n.endswith("_scale_inv") for n in json.loads((out / INDEX).read_text())["weight_map"])
