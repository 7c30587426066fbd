"""hf2mcore's rows path (``_row_parts``/``_write_rows``: rules that only move rows, inputs that must
be decoded first: FP8, another dtype) writes what the plain tensor path writes, byte for byte."""
import hashlib

import pytest

from tools.make_tiny import cached_tiny


def digest(d) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("family,fp8,dtype", [("deepseek_v3", True, "auto"), ("qwen3_moe", True, "auto"),
                                             ("qwen2", False, "bf16")],
                         ids=["deepseek_v3-fp8", "qwen3_moe-fp8", "qwen2-fp32-to-bf16"])
def test_rows_path_writes_what_the_tensor_path_writes(family, fp8, dtype, tmp_path, monkeypatch):
    from convert import hf2mcore

    src = cached_tiny(family, dtype="fp32", fp8=fp8)
    taken = []

    def counting(*a):
        r = row_parts(*a)
        taken.append(r is not None)
        return r

    row_parts = hf2mcore._row_parts
    monkeypatch.setattr(hf2mcore, "_row_parts", counting)
    hf2mcore.run(str(src), str(tmp_path / "rows"), dtype=dtype)
    assert sum(taken) > len(taken) / 2, "most tensors should take the rows path"
    monkeypatch.setattr(hf2mcore, "_row_parts", lambda *a: None)
    hf2mcore.run(str(src), str(tmp_path / "tensor"), dtype=dtype)
    assert digest(tmp_path / "rows" / "release") == digest(tmp_path / "tensor" / "release")
