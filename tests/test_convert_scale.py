"""Conversion at scale on this machine: identical results under mpiexec / torchrun ranks, and
resumption after SIGKILL at several points that ends bitwise identical to an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convert_helpers import hf_tensors
from tools.make_tiny import cached_tiny, make_tiny

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def files(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def convert(*args, launcher=()):
    r = subprocess.run([*launcher, sys.executable, "-m", "convert", *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


MPI2 = [str(BIN / "mpiexec"), "-n", "2"]


def torchrun2():
    from runtime.net import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(free_port()), "-m"]


@pytest.mark.multiproc
@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
def test_two_ranks_mpiexec_and_torchrun(family, tmp_path):
    hf = cached_tiny(family, dtype="fp32")
    convert("hf2mcore", "--hf-dir", hf, "--out", tmp_path / "one")
    convert("hf2mcore", "--hf-dir", hf, "--out", tmp_path / "mpi", launcher=MPI2)
    r = subprocess.run([*torchrun2()[:-1], "-m", "convert", "hf2mcore", "--hf-dir", str(hf), "--out",
                        str(tmp_path / "trun")], cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "mpi/release").iterdir() if p.suffix == ".distcp") == \
        ["__0_0.distcp", "__1_0.distcp"]
    assert files(tmp_path / "mpi/release") == files(tmp_path / "trun/release")
    convert("mcore2hf", "--mcore-dir", tmp_path / "mpi", "--out", tmp_path / "back1", "--max-shard-size", "3MB")
    convert("mcore2hf", "--mcore-dir", tmp_path / "mpi", "--out", tmp_path / "back2", "--max-shard-size", "3MB",
            launcher=MPI2)
    assert files(tmp_path / "back1") == files(tmp_path / "back2")
    a, b = hf_tensors(hf), hf_tensors(tmp_path / "back2")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A ~200 MB model: slow enough to be killed part-way through."""
    out = tmp_path_factory.mktemp("medium") / "hf"
    make_tiny("qwen2", out, dtype="fp32", num_hidden_layers=16, hidden_size=512,
              intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4)
    return out


def kill_when_journal_has(cmd, journal: Path, lines: int) -> int:
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline:
        if journal.is_file() and journal.read_text().count("\n") >= lines:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    return p.wait()


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(medium, tmp_path):
    ref = tmp_path / "ref"
    convert("hf2mcore", "--hf-dir", medium, "--out", ref)
    expected = files(ref / "release")
    n_steps = 16 * 7 + 3 + 1  # qwen2: 7 tensors per layer, embedding/norm/head, the objects step
    killed = 0
    for point in (1, 40, n_steps - 2):
        out = tmp_path / f"out{point}"
        cmd = [sys.executable, "-m", "convert", "hf2mcore", "--hf-dir", str(medium), "--out", str(out)]
        rc = kill_when_journal_has(cmd, out / "release/.progress/rank0.jsonl", point)
        if rc == -signal.SIGKILL:
            killed += 1
            assert not (out / "latest_checkpointed_iteration.txt").exists()
            r = subprocess.run([sys.executable, "-m", "convert", "mcore2hf", "--mcore-dir", str(out),
                                "--out", str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True, env=ENV)
            assert r.returncode == 2 and "did not finish" in r.stderr
        convert(*cmd[3:])
        assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
        assert files(out / "release") == expected
    assert killed >= 2


@pytest.mark.slow
def test_dry_run_plans_deepseek_v3_671b_on_32_ranks(tmp_path):
    """Published config + a weightless index with the real names and shapes (FP8 + scales)."""
    from tools.fake_checkpoint import fake_checkpoint

    res = fake_checkpoint(ROOT / "tools/configs/deepseek_v3_671b.json", tmp_path / "dsv3")
    assert res["files"] > 100 and res["bytes"] > 600e9
    r = convert("hf2mcore", "--hf-dir", tmp_path / "dsv3", "--out", tmp_path / "out", "--dry-run",
                "--ranks", "32")
    import json

    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["ranks"] == 32 and summary["imbalance"] <= 1.1
    assert "imbalance" in r.stdout.splitlines()[1]
    assert summary["tensors"] > 30000 and summary["bytes"] > 1.3e12  # bf16 after dequantisation
    assert not (tmp_path / "out").exists()


def test_dry_run_predicts_wall_time_per_rank_at_a_given_throughput(tmp_path):
    """The prediction's arithmetic on a weightless Qwen3-30B-A3B (real names and shapes): each rank
    = fixed start-up + its bytes / X; the slowest rank is the critical path, with its largest tensors."""
    import json

    from tools.fake_checkpoint import fake_checkpoint

    fake_checkpoint(ROOT / "tests/fixtures/published/Qwen3-30B-A3B/config.json", tmp_path / "hf")
    r = convert("hf2mcore", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "out", "--dry-run",
                "--ranks", "3,8", "--throughput-gbs", "2.5")
    assert r.stdout.count("predicted wall time") == 2 and r.stdout.count("  rank ") == 3 + 8
    plan = json.loads(r.stdout.strip().splitlines()[-1])  # one JSON line per rank count: 8 is last
    assert plan["ranks"] == 8
    p, cp = plan["prediction"], plan["prediction"]["critical_path"]
    assert p["throughput_gbs"] == 2.5 and p["throughput"]["source"] == "--throughput-gbs"
    assert 0 < p["fixed_s"] < 120
    want = [p["fixed_s"] + b / 2.5e9 for b in plan["rank_bytes"]]
    assert p["rank_seconds"] == pytest.approx(want, rel=1e-12)
    assert p["wall_seconds"] == max(want) and cp["seconds"] == max(want)
    assert cp["rank"] == want.index(max(want)) and cp["bytes"] == plan["rank_bytes"][cp["rank"]]
    assert cp["dominated_by"] == ("data" if cp["bytes"] / 2.5e9 >= p["fixed_s"] else "start-up")
    sizes = [t["bytes"] for t in cp["largest_tensors"]]
    assert len(sizes) == 3 and sizes == sorted(sizes, reverse=True) and sizes[0] <= plan["largest_tensor_bytes"]
    assert all(t["seconds"] == pytest.approx(t["bytes"] / 2.5e9) for t in cp["largest_tensors"])
    assert not (tmp_path / "out").exists()


def test_prediction_names_start_up_when_it_dominates():
    from types import SimpleNamespace

    from convert.hf2mcore import predict

    entries = [SimpleNamespace(mcore=f"t{i}", nbytes=n) for i, n in enumerate([4e9, 1e9, 3e9, 1e6])]
    plan = SimpleNamespace(entries=entries, entry_bytes=lambda e: e.nbytes)
    p = predict(plan, [0, 1, 1, 1], 2, {"gbs": 1.0, "source": "test"}, fixed_s=2.0, top=2)
    assert p["rank_seconds"] == pytest.approx([6.0, 6.001])
    assert p["critical_path"]["rank"] == 1 and p["critical_path"]["dominated_by"] == "data"
    assert [t["name"] for t in p["critical_path"]["largest_tensors"]] == ["t2", "t1"]
    slow = predict(plan, [0, 1, 1, 1], 2, {"gbs": 100.0, "source": "test"}, fixed_s=2.0)
    assert slow["critical_path"]["dominated_by"] == "start-up"


def test_throughput_probe_leaves_nothing_behind(tmp_path):
    from convert.formats import HFCheckpoint
    from convert.hf2mcore import probe_throughput

    hf = cached_tiny("qwen2", dtype="fp32")
    rate = probe_throughput(HFCheckpoint(hf), tmp_path / "not" / "yet", sample=1 << 20)
    assert rate["source"] == "probe" and rate["gbs"] > 0 and rate["read_gbs"] > 0 and rate["write_gbs"] > 0
    assert rate["probe_wrote_in"] == str(tmp_path) and list(tmp_path.iterdir()) == []
