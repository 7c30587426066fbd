"""The README's "Measured here" table, from the benchmarks' JSON lines.

Each benchmark prints a JSON object as its last line (``tools.bench_convert`` can append it to a
file with ``--json-out``). This turns such lines into the table's rows:

    python -m tools.bench_report bench.jsonl              # print the rows for these results
    python -m tools.bench_report bench.jsonl --readme README.md   # rewrite those rows in place

Rows come in groups, one per benchmark run: ``plan`` (``bench_convert --plan``), ``convert-small``
(``bench_convert --size small``: four rows), ``convert-dense`` / ``convert-moe`` (``bench_convert
--gb``: one row, two with ``--fp8``), ``sync`` (``tools.bench_sync``), ``dequant``
(``tools.bench_dequant``). ``--readme`` replaces the rows of each group it has a result for
(recognised by their command column) and keeps every other row, so benchmarks can be re-run one
at a time; a new group goes where ``GROUPS`` puts it. The last result of a group wins.
Leaves out: running the benchmarks, and any judgement of the figures beyond the issue's targets.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

GROUPS = ("plan", "convert-small", "convert-dense", "convert-moe", "sync", "dequant")
HEADER = ["| what | figure | command |", "|---|---|---|"]
TABLE_AFTER = "## Measured here"


def group_of(record: dict) -> str:
    if record.get("bench") == "plan":
        return "plan"
    if record.get("bench") == "convert":
        return f"convert-{record['kind']}" if "kind" in record else "convert-small"
    if "vllm_reload_s" in record:
        return "sync"
    if "cpu_vs_copy" in record:
        return "dequant"
    raise ValueError(f"unknown benchmark result (keys {sorted(record)[:8]}...): expected the last line of "
                     "tools.bench_convert, bench_sync or bench_dequant")


def group_of_row(command_cell: str) -> str | None:
    """The group an existing table row belongs to, from its command column (None: not ours)."""
    if "--plan" in command_cell or "fake_checkpoint" in command_cell:
        return "plan"
    if "bench_convert" in command_cell:
        kind = re.search(r"--kind (\w+)", command_cell)
        return f"convert-{kind.group(1)}" if kind else "convert-small"
    for name in ("sync", "dequant"):
        if f"bench_{name}" in command_cell:
            return name
    return None


def _row(what: str, figure: str, command: str) -> str:
    return f"| {what} | {figure} | `{command}` |"


def _x(value: float) -> str:
    return f"{value:.2f}x"


def rows_plan(r: dict) -> list[str]:
    runs = r.get("runs") or [r["seconds"]]
    return [_row(f"plan `{r['config']}` (weightless index of {r['hf_tensors']:,} tensors in {r['shards']} "
                 f"sparse shards) for {r['ranks']} ranks",
                 f"{r['seconds']:.1f} s wall (median of {len(runs)}), {r['peak_rss_gb']:.2f} GB peak RSS, "
                 f"imbalance max/mean {r['imbalance']:.4f}",
                 f"python -m tools.bench_convert --plan tools/configs/{r['config']} --ranks {r['ranks']}")]


def rows_small(r: dict) -> list[str]:
    cmd = f"python -m tools.bench_convert --size {r['size']} --repeat {r['repeat']}"
    cp, big = r["cp_seconds"], r["largest_tensor_bytes"]
    rows = [
        _row(f"hf2mcore, {r['bytes'] / 1e9:.2f} GB bf16 {r['family']}-shaped model, 1 rank (median of "
             f"{r['repeat']}, in rounds)",
             f"{r['hf2mcore_seconds']:.1f} s wall = {_x(r['hf2mcore_over_cp'])} cp "
             f"({r['hf2mcore_work_over_cp'] * cp:.1f} s = {_x(r['hf2mcore_work_over_cp'])} cp after imports); "
             f"2 ranks {r['hf2mcore_2ranks_over_cp'] * cp:.1f} s; peak RSS {r['peak_rss_gb']:.2f} GB per rank "
             f"(limit 1 GiB + 3 x {big / 1e6:.0f} MB)", cmd),
        _row("mcore2hf, the same checkpoint back",
             f"{r['mcore2hf_seconds']:.1f} s wall = {_x(r['mcore2hf_over_cp'])} cp "
             f"({r['mcore2hf_work_over_cp'] * cp:.1f} s after imports); 2 ranks {r['mcore2hf_2ranks_over_cp'] * cp:.1f} s",
             cmd)]
    if "whole_model_over_hf2mcore_time" in r:
        rows.append(_row("the same hf2mcore by the build-the-whole-model method",
                         f"{r['whole_model_over_hf2mcore_time'] * r['hf2mcore_seconds']:.1f} s "
                         f"({r['whole_model_over_hf2mcore_work']:.1f}x ours after imports), "
                         f"{r['whole_model_peak_rss'] / 1e9:.2f} GB peak RSS "
                         f"({r['whole_model_over_hf2mcore_peak_rss']:.1f}x ours)", cmd))
    rows.append(_row('`cp -r` + `sync` of the same files; `python -c "import torch"`',
                     f"{cp:.1f} s; {r['torch_import_over_cp'] * cp:.1f} s (the start-up floor of any "
                     "torch-based converter)", cmd))
    return rows


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def rows_gb(r: dict) -> list[str]:
    cmd = (f"python -m tools.bench_convert --gb {r.get('gb_asked', round(r['gb'])):g} --kind {r['kind']}"
           f"{' --fp8' if r.get('fp8') else ''} --repeat {r['repeat']}")
    cp, t = r["cp_seconds"], r.get("targets", {})
    rows = [_row(f"hf2mcore / mcore2hf, {r['gb']:.2f} GB bf16 {r['model']}-shaped ({r['layers']} layers), "
                 f"1 rank (2 ranks in brackets; median of {r['repeat']}, in rounds)",
                 f"hf2mcore {r['hf2mcore_seconds']:.1f} s = {_x(r['hf2mcore_over_cp'])} cp+sync "
                 f"({_x(r['hf2mcore_2ranks_over_cp'])}), first byte after {r['fixed_s']:.1f} s; mcore2hf "
                 f"{r['mcore2hf_seconds']:.1f} s = {_x(r['mcore2hf_over_cp'])} ({_x(r['mcore2hf_2ranks_over_cp'])}); "
                 f"cp+sync {cp:.1f} s ({r['cp_gbps']:.2f} GB/s); peak RSS {r['peak_rss_gb']:.2f} GB per rank "
                 f"(limit {r['peak_rss_limit_gb']:.2f}); targets <= 1.5x cp: hf2mcore "
                 f"{_met(t.get('hf2mcore_over_cp<=1.5', False))}, mcore2hf {_met(t.get('mcore2hf_over_cp<=1.5', False))}",
                 cmd)]
    if "fp8_hf2mcore_over_cp_bf16" in r:
        rows.append(_row(f"FP8 input -> bf16 MCore, the same {r['model']}-shaped model in DeepSeek's block FP8",
                         f"{r['fp8_hf2mcore_seconds']:.1f} s = {_x(r['fp8_hf2mcore_over_cp_bf16'])} cp+sync of the "
                         f"bf16 bytes (target <= 2x: {_met(t.get('fp8_over_cp_bf16<=2', False))})", cmd))
    return rows


def rows_sync(r: dict) -> list[str]:
    return [_row(f"live weight sync, TP=2 trainer -> vLLM, {r['model_bytes'] / 1e9:.2f} GB",
                 f"{r['sync_s']:.2f} s vs vLLM's own in-memory `reload_weights` {r['vllm_reload_s']:.2f} s "
                 f"(median paired ratio {r['ratio']:.2f} over {r['repeats']}, range {r['ratio_best']:.2f}-"
                 f"{r['ratio_worst']:.2f}); peak extra memory {r['sync_peak_extra_buckets']:.2f} buckets; "
                 f"logprobs {'bitwise equal' if r.get('same_logprobs_as_vllm_reload') else 'DIFFER'}",
                 "python -m tools.bench_sync")]


def rows_dequant(r: dict) -> list[str]:
    return [_row(f"FP8 -> BF16 block dequant, CPU path, {r['rows']} x {r['cols']}",
                 f"{r['cpu_gbps']:.1f} GB/s = {r['cpu_vs_copy']:.2f}x torch `copy_` (reference: "
                 f"{r['reference_vs_copy']:.3f}x), {'bitwise equal' if r['bitwise_equal'] else 'NOT bitwise equal'}",
                 "python -m tools.bench_dequant")]


RENDER = {"plan": rows_plan, "convert-small": rows_small, "convert-dense": rows_gb, "convert-moe": rows_gb,
          "sync": rows_sync, "dequant": rows_dequant}


def rows_for(records: list[dict]) -> dict[str, list[str]]:
    """group -> its rows, the last record of each group winning."""
    return {group_of(r): RENDER[group_of(r)](r) for r in records}


def merge(old_rows: list[str], new: dict[str, list[str]]) -> list[str]:
    """``old_rows`` with each group in ``new`` replaced in place (new groups placed by ``GROUPS``)."""
    out: list[tuple[str | None, str]] = []
    for row in old_rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        out.append((group_of_row(cells[-1]) if len(cells) >= 3 else None, row))
    have = {g for g, _ in out}
    result, emitted = [], set()
    for g, row in out:
        if g in new:
            if g not in emitted:
                result += new[g]
                emitted.add(g)
        else:
            result.append(row)
    for g in [g for g in GROUPS if g in new and g not in have]:  # new groups: after their predecessor
        before = GROUPS[: GROUPS.index(g)]
        at = max([i + 1 for i, row in enumerate(result) if group_of_row(row.rsplit("|", 2)[-2]) in before],
                 default=len(result))
        result[at:at] = new[g]
    return result


def rewrite_readme(text: str, new: dict[str, list[str]]) -> str:
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == TABLE_AFTER), None)
    if start is None:
        raise ValueError(f"no '{TABLE_AFTER}' heading in the README: add it, or print the rows without --readme")
    head = next(i for i in range(start, len(lines)) if lines[i].startswith("| what |"))
    end = head + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[:head + 2] + merge(lines[head + 2:end], new) + lines[end:]) + "\n"


def read_records(paths: list[str]) -> list[dict]:
    records = []
    for p in paths:
        text = sys.stdin.read() if p == "-" else Path(p).read_text()
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{p}:{n}: not a JSON object ({err}); pass the benchmarks' last lines") from None
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="files of benchmark JSON lines ('-' = stdin); other lines are skipped")
    p.add_argument("--readme", default=None, help="rewrite this README's 'Measured here' rows in place")
    a = p.parse_args(argv)
    new = rows_for(read_records(a.results))
    if a.readme:
        path = Path(a.readme)
        path.write_text(rewrite_readme(path.read_text(), new))
        print(f"bench_report: {sum(len(r) for r in new.values())} rows of {', '.join(new)} written to {path}")
    else:
        print("\n".join(HEADER + [row for g in GROUPS if g in new for row in new[g]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
