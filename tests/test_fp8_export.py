"""``mcore2hf --dtype fp8`` against the checkpoint it came from: a tiny DeepSeek-V3 (MTP included)
quantised the way the published checkpoint is (``tools.make_tiny --fp8``: DeepSeek's own
convention, from fp32 values), converted to bf16 MCore and exported back to FP8."""
import json

import pytest
import torch

from convert import hf2mcore, mcore2hf
from convert.__main__ import main
from convert.formats import HFCheckpoint, Reader, checkpoint_dir
from tools.make_tiny import cached_tiny

BF16_ULP = 2.0 ** -8  # bf16 keeps 8 significant bits: one ulp is at most 2^-7 relative, half of it 2^-8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    src = cached_tiny("deepseek_v3", dtype="bf16", fp8=True, mtp=True)
    hf2mcore.run(str(src), str(root / "mcore"))
    mcore2hf.run(str(root / "mcore"), str(root / "fp8"), dtype="fp8", max_shard_size="3MB")
    return src, root


def test_every_e4m3_code_and_the_layout_come_back(exported):
    src, root = exported
    a, b = HFCheckpoint(src), HFCheckpoint(root / "fp8")
    assert sorted(a.names()) == sorted(b.names())
    fp8 = sorted(n for n, i in a.tensors.items() if i.scale)
    assert fp8 == sorted(n for n, i in b.tensors.items() if i.scale)  # what stays bf16, as published
    for n in fp8:
        assert torch.equal(a.raw(n).view(torch.uint8), b.raw(n).view(torch.uint8)), n
    for n in set(a.names()) - set(fp8):
        assert torch.equal(a.raw(n), b.raw(n)) and a.raw(n).dtype == b.raw(n).dtype, n
    config = json.loads((root / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((src / "config.json").read_text())["quantization_config"]


def test_scales_differ_only_by_the_bf16_rounding_of_the_block_max(exported):
    src, root = exported
    a, b = HFCheckpoint(src), HFCheckpoint(root / "fp8")
    worst = 0.0
    for n, info in a.tensors.items():
        if info.scale:
            s_a, s_b = a.raw(info.scale), b.raw(b.tensors[n].scale)
            worst = max(worst, ((s_a - s_b).abs() / s_a.abs()).max().item())
    print(f"largest relative scale difference: {worst:.3e}")
    assert 0 < worst <= BF16_ULP


def test_reimport_is_within_one_bf16_ulp_of_the_mcore_weights(exported, tmp_path):
    _, root = exported
    hf2mcore.run(str(root / "fp8"), str(tmp_path / "again"))
    first, again = Reader(checkpoint_dir(root / "mcore")), Reader(checkpoint_dir(tmp_path / "again"))
    keys = sorted(k for k in first.keys() if "/shard_" not in k)
    assert keys == sorted(k for k in again.keys() if "/shard_" not in k)
    for k in keys:
        size = list(first.tensor_meta(k).size)
        x, y = (r.read_region(k, [0] * len(size), size).float() for r in (first, again))
        assert ((x - y).abs() <= 2 * BF16_ULP * x.abs() + 1e-30).all(), k


def test_fp8_cast_bf16_reads_the_export(exported, tmp_path):
    from tools.fp8_cast_bf16 import main as cast

    _, root = exported
    assert cast(["--in", str(root / "fp8"), "--out", str(tmp_path / "bf16")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())


def test_fp8_for_a_family_without_a_published_fp8_layout_is_one_line(tmp_path, capsys):
    src = cached_tiny("qwen2")
    hf2mcore.run(str(src), str(tmp_path / "m"))
    rc = main(["mcore2hf", "--mcore-dir", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--dtype", "fp8"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert rc == 2 and len(err) == 1 and "publishes no FP8 layout" in err[0]
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()
