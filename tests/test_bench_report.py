"""``tools.bench_report``: benchmark JSON lines -> the README's "Measured here" rows (no timing here:
the JSON is a fixed sample in the benchmarks' own formats)."""
import json

import pytest

from tools import bench_report

PLAN = {"bench": "plan", "config": "deepseek_v3_671b.json", "hf_tensors": 91991, "shards": 161, "ranks": 32,
        "seconds": 3.81, "runs": [3.7, 3.81, 4.2], "peak_rss_gb": 0.71, "imbalance": 1.0000278, "tensors": 31015}
GB = {"bench": "convert", "kind": "dense", "model": "Qwen2.5-7B", "layers": 12, "gb": 7.77, "gb_asked": 8, "fp8": True,
      "repeat": 3,
      "bytes": 7773412649, "largest_tensor_bytes": 1089994752, "cp_seconds": 4.5, "cp_gbps": 1.73,
      "hf2mcore_seconds": 6.3, "hf2mcore_over_cp": 1.4, "hf2mcore_2ranks_over_cp": 1.38, "mcore2hf_seconds": 7.2,
      "mcore2hf_over_cp": 1.6, "mcore2hf_2ranks_over_cp": 1.43, "fixed_s": 1.5, "peak_rss_gb": 1.16,
      "peak_rss_limit_gb": 4.34, "fp8_hf2mcore_seconds": 8.6, "fp8_hf2mcore_over_cp_bf16": 1.91,
      "targets": {"hf2mcore_over_cp<=1.5": True, "mcore2hf_over_cp<=1.5": False, "fp8_over_cp_bf16<=2": True}}
SMALL = {"bench": "convert", "size": "small", "family": "qwen2", "repeat": 5, "bytes": 1790000000,
         "largest_tensor_bytes": 101000000, "cp_seconds": 1.1, "torch_import_over_cp": 0.9,
         "hf2mcore_seconds": 3.0, "hf2mcore_over_cp": 2.66, "hf2mcore_work_over_cp": 1.62,
         "hf2mcore_2ranks_over_cp": 2.7, "mcore2hf_seconds": 3.0, "mcore2hf_over_cp": 2.74,
         "mcore2hf_work_over_cp": 1.55, "mcore2hf_2ranks_over_cp": 3.1, "peak_rss_gb": 0.43,
         "whole_model_over_hf2mcore_time": 3.6, "whole_model_over_hf2mcore_work": 4.0,
         "whole_model_peak_rss": 5.37e9, "whole_model_over_hf2mcore_peak_rss": 12.9}
SYNC = {"model_bytes": 580000000, "sync_s": 0.45, "vllm_reload_s": 0.42, "ratio": 1.05, "repeats": 5,
        "ratio_best": 0.62, "ratio_worst": 1.43, "sync_peak_extra_buckets": 1.54, "same_logprobs_as_vllm_reload": True}
DEQUANT = {"rows": 8192, "cols": 16384, "cpu_gbps": 13.7, "cpu_vs_copy": 0.53, "reference_vs_copy": 0.0101,
           "bitwise_equal": True}

README = """# x

## Measured here

Machine: something.

| what | figure | command |
|---|---|---|
| plan DeepSeek-V3 for 32 ranks | 9.0 s wall | `python -m tools.fake_checkpoint ...` then `hf2mcore --dry-run --ranks 32` |
| hf2mcore, 1.79 GB | 3.0 s | `python -m tools.bench_convert --repeat 5` |
| mcore2hf, back | 3.0 s | `python -m tools.bench_convert --repeat 5` |
| live weight sync | 0.45 s | `python -m tools.bench_sync` |
| FP8 -> BF16 block dequant | 13.7 GB/s | `python -m tools.bench_dequant` |

## Limitations
"""


def test_rows_from_sample_json(tmp_path, capsys):
    results = tmp_path / "bench.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in (PLAN, GB, SMALL, SYNC, DEQUANT)) + "\nnot json\n")
    assert bench_report.main([str(results)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[:2] == bench_report.HEADER and len(rows) == 2 + 1 + 4 + 2 + 1 + 1
    assert rows[2] == ("| plan `deepseek_v3_671b.json` (weightless index of 91,991 tensors in 161 sparse shards) for "
                       "32 ranks | 3.8 s wall (median of 3), 0.71 GB peak RSS, imbalance max/mean 1.0000 | "
                       "`python -m tools.bench_convert --plan tools/configs/deepseek_v3_671b.json --ranks 32` |")
    assert rows[3].startswith("| hf2mcore, 1.79 GB bf16 qwen2-shaped model, 1 rank (median of 5, in rounds) | "
                              "3.0 s wall = 2.66x cp (1.8 s = 1.62x cp after imports); 2 ranks 3.0 s; ")
    assert "| 10.8 s (4.0x ours after imports), 5.37 GB peak RSS (12.9x ours) |" in rows[5]
    dense, fp8 = rows[7], rows[8]
    assert dense.startswith("| hf2mcore / mcore2hf, 7.77 GB bf16 Qwen2.5-7B-shaped (12 layers), ")
    assert ("hf2mcore 6.3 s = 1.40x cp+sync (1.38x), first byte after 1.5 s; mcore2hf 7.2 s = 1.60x (1.43x)" in dense
            and "targets <= 1.5x cp: hf2mcore met, mcore2hf missed" in dense)
    assert dense.endswith("| `python -m tools.bench_convert --gb 8 --kind dense --fp8 --repeat 3` |")
    assert "8.6 s = 1.91x cp+sync of the bf16 bytes (target <= 2x: met)" in fp8
    assert "(median paired ratio 1.05 over 5, range 0.62-1.43); peak extra memory 1.54 buckets; logprobs bitwise" in rows[9]
    assert rows[10] == ("| FP8 -> BF16 block dequant, CPU path, 8192 x 16384 | 13.7 GB/s = 0.53x torch `copy_` "
                        "(reference: 0.010x), bitwise equal | `python -m tools.bench_dequant` |")


def test_readme_rows_replaced_by_group_others_kept(tmp_path):
    readme, results = tmp_path / "README.md", tmp_path / "bench.jsonl"
    readme.write_text(README)
    results.write_text(json.dumps(PLAN) + "\n" + json.dumps(GB) + "\n")
    assert bench_report.main([str(results), "--readme", str(readme)]) == 0
    lines = readme.read_text().splitlines()
    table = [ln for ln in lines if ln.startswith("|")][2:]
    assert [bench_report.group_of_row(row.rsplit("|", 2)[-2]) for row in table] == \
        ["plan", "convert-small", "convert-small", "convert-dense", "convert-dense", "sync", "dequant"]
    assert table[0].startswith("| plan `deepseek_v3_671b.json`") and table[1] == "| hf2mcore, 1.79 GB | 3.0 s | " \
        "`python -m tools.bench_convert --repeat 5` |"
    assert lines[-1] == "## Limitations" and "Machine: something." in lines
    again = readme.read_text()
    assert bench_report.rewrite_readme(again, bench_report.rows_for([PLAN, GB])) == again  # idempotent


def test_unknown_json_is_refused_with_the_expected_sources():
    with pytest.raises(ValueError, match="bench_convert, bench_sync or bench_dequant"):
        bench_report.rows_for([{"foo": 1}])
