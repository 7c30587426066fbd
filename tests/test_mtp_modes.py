"""``hf2mcore --mtp auto|require|drop`` on DeepSeek-V3 shapes, and what lands in ``common.pt``.

The "declared but absent" input is made by the real peer: transformers loads a tiny DeepSeek-V3
with its MTP layer (which its model class ignores) and ``save_pretrained`` writes the copy users
download from fine-tuners: ``num_nextn_predict_layers: 1`` and no ``model.layers.{N}.*`` tensors.
"""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert import hf2mcore, mcore2hf
from convert.__main__ import main
from convert.formats import checkpoint_dir, record
from convert.formats import Reader
from convert_helpers import hf_tensors
from tools.make_tiny import cached_tiny


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("hf") / "ds-saved"
    model = AutoModelForCausalLM.from_pretrained(cached_tiny("deepseek_v3", mtp=True), dtype=torch.float32)
    model.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
    assert not any(n.startswith("model.layers.4.") for n in hf_tensors(out))  # 4 layers: MTP would be 4
    return out


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _mtp_keys(root) -> list[str]:
    return [k for k in Reader(checkpoint_dir(root)).keys() if k.startswith("mtp.")]


def _round_trip_equal(src, mcore, tmp_path):
    back = tmp_path / "back"
    mcore2hf.run(str(mcore), str(back))
    a, b = hf_tensors(src), hf_tensors(back)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_auto_converts_without_absent_mtp(saved_by_transformers, tmp_path):
    res = hf2mcore.run(str(saved_by_transformers), str(tmp_path / "m"))
    assert res["mtp"] == "absent" and record(tmp_path / "m")["mtp"] == "absent"
    assert any("converted without MTP" in n for n in res["notes"])
    assert _mtp_keys(tmp_path / "m") == []
    _round_trip_equal(saved_by_transformers, tmp_path / "m", tmp_path)


def test_auto_converts_present_mtp(tmp_path):
    src = cached_tiny("deepseek_v3", mtp=True)
    res = hf2mcore.run(str(src), str(tmp_path / "m"))
    assert res["mtp"] == "present" and record(tmp_path / "m")["mtp"] == "present"
    assert _mtp_keys(tmp_path / "m")
    _round_trip_equal(src, tmp_path / "m", tmp_path)


def test_require_refuses_absent_mtp_in_one_line(saved_by_transformers, tmp_path, capsys):
    before = _digest(saved_by_transformers)
    rc = main(["hf2mcore", "--hf-dir", str(saved_by_transformers), "--out", str(tmp_path / "m"), "--mtp", "require"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert rc == 2 and len(err) == 1
    assert "--mtp require" in err[0] and "model.layers.4." in err[0]
    assert not (tmp_path / "m").exists() and _digest(saved_by_transformers) == before


def test_partial_mtp_names_the_first_missing_tensor(tmp_path, capsys):
    src = tmp_path / "partial"
    shutil.copytree(cached_tiny("deepseek_v3", mtp=True), src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = "model.layers.4.eh_proj.weight"
    fname = index["weight_map"].pop(victim)
    tensors = load_file(src / fname)
    del tensors[victim]
    save_file(tensors, src / fname)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    rc = main(["hf2mcore", "--hf-dir", str(src), "--out", str(tmp_path / "m")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert rc == 2 and len(err) == 1 and victim in err[0] and "partly present" in err[0]
    assert not (tmp_path / "m").exists()


def test_drop_leaves_mtp_out_and_validate_agrees(tmp_path):
    from convert import validate

    src = cached_tiny("deepseek_v3", mtp=True)
    res = hf2mcore.run(str(src), str(tmp_path / "m"), mtp="drop")
    assert res["mtp"] == "dropped" and _mtp_keys(tmp_path / "m") == []
    report = validate.run(str(src), str(tmp_path / "m"), progress=False)
    assert report["passed"], report["checks"]
    assert any("--mtp drop" in n for n in report["notes"])


def test_common_pt_holds_what_megatron_lm_load_reads(saved_by_transformers, tmp_path):
    """Megatron-LM's --load reads iteration, checkpoint_version, args (num_layers, hidden_size and
    num_attention_heads are checked against the run's) and content_metadata from common.pt."""
    import megatron.core  # noqa: F401  (registers argparse.Namespace as a safe global for torch.load)

    cfg = json.loads((saved_by_transformers / "config.json").read_text())
    for src, mtp in ((saved_by_transformers, None), (cached_tiny("deepseek_v3", mtp=True), 1)):
        out = tmp_path / f"m{mtp}"
        hf2mcore.run(str(src), str(out))
        common = torch.load(checkpoint_dir(out) / "common.pt")
        assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
        assert common["content_metadata"] == {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
        args = common["args"]
        assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (
            cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"])
        assert args.num_experts == cfg["n_routed_experts"] and args.mtp_num_layers == mtp
        assert args.moe_layer_freq == [0] * cfg["first_k_dense_replace"] + [1] * (
            cfg["num_hidden_layers"] - cfg["first_k_dense_replace"])
        assert (out / "megatron_lm_args.txt").read_text().count("--moe-layer-freq [0]*1+[1]*3") == 1
