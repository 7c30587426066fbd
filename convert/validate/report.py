"""The table ``python -m convert validate`` prints: one row per check, offenders, limits, notes."""
from __future__ import annotations


def _num(x) -> str:
    return "-" if x is None else ("0" if x == 0 else f"{x:.2e}")


def _row(c: dict) -> list[str]:
    m, lim = c["metrics"], c["limits"]
    if c["check"] == "tensors":
        return [c["check"], c["target"], "PASS" if c["passed"] else "FAIL", _num(m.get("max_abs_diff")),
                "bitwise", "-", "-", "-", "-", c["message"]]
    cells = [_num(m.get("max_abs_diff")), _num(lim.get("max_abs")), _num(m.get("mean_abs_diff")),
             _num(lim.get("mean_abs"))]
    top1 = m.get("top1_agreement")
    cells += ["-" if top1 is None else f"{top1:.1%}", "-" if "top1" not in lim else f">={lim['top1']:.1%}"]
    return [c["check"], c["target"], "PASS" if c["passed"] else "FAIL", *cells, c["message"]]


def format_report(report: dict, max_listed: int = 20) -> str:
    head = ["check", "target", "result", "max|d|", "limit", "mean|d|", "limit", "top-1", "limit", "detail"]
    rows = [head] + [_row(c) for c in report["checks"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    for c in report["checks"]:
        if c["offenders"]:
            lines.append(f"{c['check']}: {len(c['offenders'])} offending tensors/keys:")
            for o in c["offenders"][:max_listed]:
                name = o.get("tensor") or o.get("key")
                what = o.get("problem") or o.get("detail") or (
                    f"max|diff| {o['max_abs_diff']:.3e}, {o['elements_differing']}/{o['numel']} elements differ"
                    f" (MCore {o['mcore']})")
                lines.append(f"  {name}: {what}")
            if len(c["offenders"]) > max_listed:
                lines.append(f"  (+{len(c['offenders']) - max_listed} more; --json REPORT lists all)")
    bases: dict[str, list[str]] = {}
    for c in report["checks"]:
        if c["limits"].get("basis"):
            bases.setdefault(c["limits"]["basis"], []).append(c["check"])
    lines += [f"limits ({', '.join(dict.fromkeys(checks))}): {basis}" for basis, checks in bases.items()]
    lines += [f"note: {n}" for n in report["notes"]]
    n_ok = sum(c["passed"] for c in report["checks"])
    lines.append(f"validate: {report['family']} {'PASS' if report['passed'] else 'FAIL'}: {n_ok}/"
                 f"{len(report['checks'])} checks passed in {report['seconds']:.1f}s "
                 f"({report['mcore_dir']} vs {report['hf_dir']})")
    return "\n".join(lines)
