"""hf2mcore on a DeepSeek FP8 checkpoint dequantises on the fly: its output is bitwise identical
to fp8_cast_bf16 followed by hf2mcore, and the plan hides the *_scale_inv companions."""
import subprocess
import sys
from pathlib import Path

import pytest

from convert.formats import HFCheckpoint
from tools.make_tiny import cached_tiny

ROOT = Path(__file__).resolve().parents[1]


def files(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def run(*args):
    r = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("family", ["deepseek_v3", "moonlight"])
def test_fp8_input_equals_cast_then_convert(family, tmp_path):
    fp8 = cached_tiny(family, dtype="bf16", fp8=True)
    ck = HFCheckpoint(fp8)
    assert any(i.scale for i in ck.tensors.values())
    assert not any(n.endswith("_scale_inv") for n in ck.names())
    run("convert", "hf2mcore", "--hf-dir", fp8, "--out", tmp_path / "direct")
    run("tools.fp8_cast_bf16", "--in", fp8, "--out", tmp_path / "bf16")
    run("convert", "hf2mcore", "--hf-dir", tmp_path / "bf16", "--out", tmp_path / "via_cast")
    assert files(tmp_path / "direct/release") == files(tmp_path / "via_cast/release")
    import json

    assert "quantization_config" not in json.loads((tmp_path / "direct/hf/config.json").read_text())
