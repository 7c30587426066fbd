"""Parallel layouts for ``python -m convert validate``: which layouts a model can run at, and the
logits at each, from this process (one rank) or from a ``torchrun`` it starts per world size.

Leaves out: building and loading the models (``convert.validate.worker``), judging the logits
(``convert.validate.checks``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from convert.validate import checks as C
from convert.validate.worker import CONSUMER, Layout
from runtime.net import free_port


def check_layout(layout: Layout, m, seq_len: int) -> None:
    t = m.transformer
    problems = []
    if layout.ep > 1 and not m.num_experts:
        problems.append(f"ep{layout.ep} needs experts; {m.family} is dense")
    elif m.num_experts % layout.ep:
        problems.append(f"{m.num_experts} experts do not split over ep{layout.ep}")
    if m.num_layers % layout.pp:
        problems.append(f"{m.num_layers} layers do not split over pp{layout.pp}")
    heads, groups = t["num_attention_heads"], t.get("num_query_groups") or t["num_attention_heads"]
    if heads % layout.tp or (not m.mla and groups % layout.tp):
        problems.append(f"{heads} heads / {groups} query groups do not split over tp{layout.tp}")
    if seq_len % layout.tp:
        problems.append(f"--seq-len {seq_len} is not a multiple of tp{layout.tp}")
    if m.num_experts and t.get("add_bias_linear") and (layout.etp or layout.tp) > 1:
        problems.append(f"{m.family}'s experts have biases, which Megatron-Core allows only at expert-tensor-parallel "
                        f"size 1: use tp{layout.tp}etp1")
    if problems:
        raise C.ValidateError(f"layout {layout.name}: " + "; ".join(problems))


def layouts_from(args_layouts: str | None, tp: int, ep: int, pp: int) -> list[Layout]:
    out = [Layout(tp, ep, pp)]
    try:
        out += [Layout.parse(t) for t in (args_layouts or "").split(",") if t.strip()]
    except ValueError as err:
        raise C.ValidateError(f"--layouts: {err}") from None
    unique = {}
    for lay in out:
        unique.setdefault(lay.name, lay)
    return list(unique.values())


def spawn(world: int, layouts: list[Layout], hf_dir: Path, ckpt: Path, ids_path: Path, dtype: str,
          out: Path, timeout: float, flags_path: Optional[Path] = None) -> str:
    """Run the layouts of one world size under torchrun; '' on success, else the error tail."""
    args = ["-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port", str(free_port()),
            "-m", "convert.validate.worker", "layouts", "--hf-config", str(hf_dir / "config.json"),
            "--ckpt", str(ckpt), "--layouts", ",".join(x.name for x in layouts), "--ids", str(ids_path),
            "--dtype", dtype, "--out", str(out)] + (["--consumer-flags", str(flags_path)] if flags_path else [])
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // world))
    return C.run_python(args, f"torchrun ({world} ranks)", timeout, OMP_NUM_THREADS=threads)


def layout_logits(layouts, hf_dir: Path, ckpt: Path, ids_BS, dtype: str, scratch: Path,
                  timeout: float, flags: Optional[str] = None) -> dict[str, torch.Tensor | str]:
    """Logits per layout name (and ``consumer/<layout>`` with ``flags``), or the error message
    for layouts whose run failed."""
    from convert.validate.worker import run_layouts
    from runtime import megatron as rt

    results: dict[str, torch.Tensor | str] = {}
    ids_path, flags_path = scratch / "ids.pt", scratch / "megatron_lm_args.txt"
    torch.save(ids_BS, ids_path)
    if flags is not None:
        flags_path.write_text(flags)
    for world in sorted({x.world for x in layouts}):
        group = [x for x in layouts if x.world == world]
        C.say(f"logits at {', '.join(x.name for x in group)} ({world} rank{'s' * (world > 1)})")
        if world == 1:
            config = json.loads((hf_dir / "config.json").read_text())
            results.update(run_layouts(config, str(ckpt), group, ids_BS, rt.DTYPES[dtype], flags))
            continue
        out = scratch / f"world{world}"
        out.mkdir()
        err = spawn(world, group, hf_dir, ckpt, ids_path, dtype, out, timeout,
                    flags_path if flags is not None else None)
        names = [x.name for x in group] + [CONSUMER + x.name for x in group if flags is not None and x.etp is None]
        for name in names:
            f = out / f"{name.replace('/', '-')}.pt"
            results[name] = torch.load(f, weights_only=True) if not err and f.is_file() else \
                (err or (f.with_suffix(".err").read_text().strip() if f.with_suffix(".err").is_file()
                         else f"{f} was not written"))
    return results


def consistency(results: dict, limits: C.Limits) -> C.CheckResult:
    names = [n for n, v in results.items() if isinstance(v, torch.Tensor) and not n.startswith(CONSUMER)]
    base = names[0]
    pairs = {f"{n} vs {base}": C.metrics(results[n], results[base]) for n in names[1:]}
    worst = {k: max(p[k] for p in pairs.values()) for k in ("max_abs_diff", "mean_abs_diff")}
    worst["top1_agreement"] = min(p["top1_agreement"] for p in pairs.values())
    res = C.judge("layouts", ",".join(names), worst, limits)
    res.metrics["pairs"] = pairs
    return res


# --------------------------------------------------------------------------- run
