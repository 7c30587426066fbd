"""Bad input catalogue for hf2mcore / mcore2hf: each case gives one line on stderr naming the
problem, exit code 2, an untouched input, and no output that looks complete."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert.__main__ import main
from tools.make_tiny import cached_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tmp_path):
    src = cached_tiny("qwen2", dtype="fp32")
    dst = tmp_path / "in"
    shutil.copytree(src, dst)
    return dst


def digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def rewrite_shard(d: Path, fn) -> None:
    """Apply ``fn(tensors_dict)`` to the shard holding the first layer, keep the index in sync."""
    idx = index(d)
    fname = idx["weight_map"]["model.layers.0.input_layernorm.weight"]
    tensors = load_file(d / fname)
    fn(tensors)
    save_file(tensors, d / fname)
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != fname}
    idx["weight_map"].update({k: fname for k in tensors})
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


def run(capsys, args):
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, [line for line in err if "error:" in line]


def corrupt_missing_shard(d):
    os.remove(d / sorted(set(index(d)["weight_map"].values()))[-1])


def corrupt_truncated(d):
    f = d / sorted(set(index(d)["weight_map"].values()))[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def corrupt_escape(d):
    idx = index(d)
    idx["weight_map"]["model.norm.weight"] = "../../x.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


def corrupt_unknown_arch(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))


def corrupt_shape(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 64
    (d / "config.json").write_text(json.dumps(cfg))


def set_config(**fields):
    """A config.json edit: what a fine-tune or a hand edit would change."""
    def corrupt(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(fields)
        (d / "config.json").write_text(json.dumps(cfg))
    return corrupt


CASES = {
    "missing_shard": (corrupt_missing_shard, "missing"),
    # config.json asking for what Megatron-Core cannot express (the tiny Qwen2 has 4 layers)
    "hidden_act": (set_config(hidden_act="gelu"), 'hidden_act="gelu"'),
    "rope_type": (set_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
    "sliding_window": (set_config(use_sliding_window=True, sliding_window=1024,
                                  layer_types=["sliding_attention"] * 4), "sliding_window=1024"),
    "quantization": (set_config(quantization_config={"quant_method": "gptq", "bits": 4}), "gptq"),
    "truncated_shard": (corrupt_truncated, "truncated"),
    "tensor_missing": (lambda d: rewrite_shard(d, lambda t: t.pop("model.layers.0.input_layernorm.weight")),
                       "model.layers.0.input_layernorm.weight"),
    "extra_tensor": (lambda d: rewrite_shard(d, lambda t: t.update({"model.layers.0.mystery.weight": torch.ones(3)})),
                     "model.layers.0.mystery.weight"),
    "shape_vs_config": (corrupt_shape, "mlp.gate_proj.weight has shape"),
    "unknown_architecture": (corrupt_unknown_arch, "MysteryForCausalLM"),
    "index_escapes_dir": (corrupt_escape, "outside"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_hf2mcore(case, ckpt, tmp_path, capsys):
    corrupt, needle = CASES[case]
    corrupt(ckpt)
    before = digest(ckpt)
    out = tmp_path / "out"
    rc, errors = run(capsys, ["hf2mcore", "--hf-dir", str(ckpt), "--out", str(out)])
    assert rc == 2
    assert len(errors) == 1 and needle in errors[0], errors
    assert digest(ckpt) == before
    assert not (out / "latest_checkpointed_iteration.txt").exists()


def test_output_not_ours_is_refused_unless_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    rc, errors = run(capsys, ["hf2mcore", "--hf-dir", str(ckpt), "--out", str(out)])
    assert rc == 2 and "--overwrite" in errors[0]
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(["hf2mcore", "--hf-dir", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "release"


def test_unwritable_output(ckpt, tmp_path, capsys):
    """--out below a regular file: the directory cannot be created (root ignores chmod here)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, errors = run(capsys, ["hf2mcore", "--hf-dir", str(ckpt), "--out", str(blocker / "out")])
    assert rc == 2 and "cannot write" in errors[0]


def test_mcore2hf_refuses_incomplete_conversion(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["hf2mcore", "--hf-dir", str(ckpt), "--out", str(out)]) == 0
    (out / "latest_checkpointed_iteration.txt").unlink()
    rc, errors = run(capsys, ["mcore2hf", "--mcore-dir", str(out), "--out", str(tmp_path / "hf")])
    assert rc == 2 and "latest_checkpointed_iteration.txt" in errors[0]


def test_cli_exit_code_and_single_line(ckpt, tmp_path):
    corrupt_unknown_arch(ckpt)
    r = subprocess.run([sys.executable, "-m", "convert", "hf2mcore", "--hf-dir", str(ckpt),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1 and "MysteryForCausalLM" in lines[0] and "Traceback" not in r.stderr


def test_disk_full_injected_then_resume(ckpt, tmp_path, capsys, monkeypatch):
    """ENOSPC part-way through: one line, exit 2, no marker; the same command then resumes."""
    import errno

    from convert.formats import Writer

    calls = {"n": 0}

    def full_after_five(real):  # chunks go through write_tensor or (rows only move) write_copied
        def write(self, piece, data):
            calls["n"] += 1
            if calls["n"] > 5:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.dir / self.relpath))
            return real(self, piece, data)
        return write

    out = tmp_path / "out"
    for name in ("write_tensor", "write_copied"):
        monkeypatch.setattr(Writer, name, full_after_five(getattr(Writer, name)))
    rc, errors = run(capsys, ["hf2mcore", "--hf-dir", str(ckpt), "--out", str(out)])
    assert rc == 2 and len(errors) == 1 and "no space left" in errors[0]
    assert calls["n"] > 5 and not (out / "latest_checkpointed_iteration.txt").exists()
    monkeypatch.undo()
    assert main(["hf2mcore", "--hf-dir", str(ckpt), "--out", str(out)]) == 0
    ref = tmp_path / "ref"
    assert main(["hf2mcore", "--hf-dir", str(ckpt), "--out", str(ref)]) == 0
    assert digest(out / "release") == digest(ref / "release")


def test_disk_full_on_a_real_small_tmpfs(ckpt, tmp_path, capsys):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        rc, errors = run(capsys, ["hf2mcore", "--hf-dir", str(ckpt), "--out", str(mnt / "out")])
        assert rc == 2 and "no space left" in errors[0].lower()
        assert not (mnt / "out" / "latest_checkpointed_iteration.txt").exists()
        rc, errors = run(capsys, ["mcore2hf", "--mcore-dir", str(mnt / "out"), "--out", str(tmp_path / "x")])
        assert rc == 2 and "did not finish" in errors[0]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_fp8_weight_without_scale(tmp_path, capsys):
    src = cached_tiny("deepseek_v3", dtype="bf16", fp8=True)
    d = tmp_path / "fp8"
    shutil.copytree(src, d)
    idx = index(d)
    victim = next(k for k in idx["weight_map"] if k.endswith("_scale_inv"))
    fname = idx["weight_map"].pop(victim)
    tensors = load_file(d / fname)
    del tensors[victim]
    save_file(tensors, d / fname)
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    rc, errors = run(capsys, ["hf2mcore", "--hf-dir", str(d), "--out", str(tmp_path / "o")])
    assert rc == 2 and victim[: -len("_scale_inv")] in errors[0] and "scale_inv" in errors[0]
