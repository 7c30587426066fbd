"""``python -m convert validate``: prove that a Megatron-Core checkpoint is a faithful conversion.

Given the HF checkpoint IN and the converted MCore root OUT it runs, and reports in one table
(plus ``--json``), with exit status 0 only if every check passes, 1 if any fails, 2 if the input
is unusable:

1. tensors: every HF tensor of IN equals its round trip through OUT, bitwise (FP8 inputs:
   their dequantised values); mismatches are named with their max |diff|;
2. logits: transformers' forward on IN against a ``GPTModel`` built at each requested layout and
   loaded from OUT by MCore's own ``dist_checkpointing.load``, on a fixed random token batch;
   layouts with more than one rank run under a ``torchrun`` this command starts itself (one
   launch per world size);
3. layouts: the layouts agree with each other within the same limits;
4. consumer: the ``GPTModel`` Megatron-LM's ``pretrain_gpt.py`` builds from the model flags users
   train with (``--megatron-args``, default the ``megatron_lm_args.txt`` hf2mcore wrote; built by
   ``runtime.megatron_lm``, which mirrors Megatron-LM's argument handling and knows nothing of our
   mapping) loads OUT with Megatron-LM's strict nested load at each layout and matches
   transformers' logits in fp32. Left out, with a note, for a family whose model no flags describe
   (``Family.megatron_lm_gap``, e.g. Gemma 3) unless ``--megatron-args`` names a file;
5. ``--vllm``: OUT exported with ``mcore2hf`` loads in vLLM and its prompt log-probs match
   transformers'.

Limits depend on the compute dtype (see ``convert.validate.checks``). Equivalence caveats the
family's config reader knows about (e.g. group-limited routing that Megatron-Core scores
differently) are printed as notes and attached to failing logits rows.

Leaves out: multi-node launches (torchrun here uses one node: world size <= the node's
devices/cores), pipeline schedules (stages pass activations with plain sends), the MTP head's
logits (its weights are in the tensor check). Without it, the only way to trust a conversion is
to train on it and see.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from convert.conversion_plan import (check_hf_names, check_hf_shapes, hf_view, mtp_hf_names, plan_for_checkpoint,
                                     read_model)
from convert.formats import TE_MARKER, HFCheckpoint, Reader, checkpoint_dir
from convert.hf2mcore import ARGS_FILE
from convert.megatron_args import config_overrides, flag_lines, megatron_args
from convert.validate import checks as C
from convert.validate.checks import ValidateError, say
from convert.validate.layouts import check_layout, consistency, layout_logits, layouts_from
from convert.validate.report import format_report
from convert.validate.worker import CONSUMER, Layout

HELP = """\
consumer stage: --megatron-args FILE takes the MODEL_ARGS you pass to pretrain_gpt.py (architecture
  flags; --transformer-impl local is added: no Transformer Engine here); lines '# config-overrides: {..}'
  set config fields no flag reaches (hf2mcore writes one where a model needs it, e.g. Kimi-K2's yarn).

layouts: sizes run together, layouts separated by commas, e.g. --layouts tp2,ep2,tp2ep2,pp2
  (tp = tensor, ep = expert, pp = pipeline, etp = expert-tensor parallel). Each layout needs
  pp * lcm(tp, etp * ep) ranks; layouts with more than one rank run under torchrun on this node.

limits: fp32: max|d| <= 1e-4 x max(1, max|logit|), top-1 >= 99%. bf16/fp16: the reference is
  transformers in fp32 on the same weights; MCore (and vLLM) may be at most 3x as far from it as
  transformers' own bf16/fp16 forward is (mean, max, top-1); see convert/validate_checks.py.

exit status: 0 every check passed, 1 a check failed, 2 unusable input or flags.

examples:
  python -m convert validate --hf-dir Qwen3-8B --mcore-dir ckpt/qwen3-8b
  python -m convert validate --hf-dir IN --mcore-dir OUT --layouts tp2,ep2 --json report.json
  python -m convert validate --hf-dir IN --mcore-dir OUT --tp 2 --vllm
"""


def open_inputs(hf_dir: str, mcore_dir: str):
    """``(hf, ckpt, reader, plan, stored dtype, notes)``; MTP layers as OUT stores them: IN's MTP
    tensors are left out of the comparison when OUT was converted without them (``--mtp drop``)."""
    hf = HFCheckpoint(hf_dir)
    ckpt = checkpoint_dir(mcore_dir)
    reader = Reader(ckpt)
    stored = reader.tensor_meta("embedding.word_embeddings.weight").properties.dtype
    if TE_MARKER in reader.keys():
        raise ValidateError(f"{mcore_dir}: a --spec te checkpoint; validate builds local-spec models "
                            "(TE needs CUDA): convert with --spec local to validate, the weights are the same")
    source = str(Path(hf_dir) / "config.json")
    plan, notes = plan_for_checkpoint(hf.config, stored, reader.keys(), source=source)
    left_out = set()
    if notes:
        left_out = set(mtp_hf_names(*read_model(hf.config, source))) & set(hf.names())
        if left_out:
            notes.append(f"IN's {len(left_out)} MTP tensors are not in OUT (hf2mcore --mtp drop): not compared")
    view = hf_view(plan, [n for n in hf.names() if n not in left_out], hf.info)
    check_hf_names(plan, view)
    check_hf_shapes(plan, view, source=f"{hf_dir}: ")
    return hf, ckpt, reader, plan, stored, notes


def run(hf_dir: str, mcore_dir: str, *, layouts: list[Layout] = (Layout(),), vllm: bool = False,
        compute_dtype: str = "auto", batch: int = 4, seq_len: int = 64, seed: int = 0,
        vllm_dtype_name: str = "auto", vllm_memory: float = 0.1, timeout: float = 1800,
        progress: bool = True, megatron_args: Optional[str] = "auto") -> dict:
    """Run every check; returns the report (``report["passed"]`` is the verdict).

    ``megatron_args``: the Megatron-LM model flags of the consumer stage: a file, ``"auto"``
    (OUT's ``megatron_lm_args.txt``, else the flags derived from config.json) or None (no stage)."""
    from runtime import megatron as rt

    t0 = time.time()
    hf, ckpt, reader, plan, stored, notes = open_inputs(hf_dir, mcore_dir)
    m = plan.model
    for lay in layouts:
        check_layout(lay, m, seq_len)
    if vllm and _missing("vllm"):
        raise ValidateError("--vllm: vLLM is not installed in this environment (pip install -e .[cpu])")
    dtype = _name(stored if compute_dtype == "auto" else rt.DTYPES[compute_dtype])
    notes = list(m.notes) + notes
    if m.transformer.get("mtp_num_layers"):
        notes.append("MTP layer: its tensors are checked; the logits cover the main model only")
    if stored != hf_dtype(hf):
        notes.append(f"OUT stores {_name(stored)}, IN {_name(hf_dtype(hf))}: tensors compared with IN "
                     "rounded to OUT's dtype")
    flags, flags_source = consumer_flags(megatron_args, Path(mcore_dir), m, stored)
    if flags is None and megatron_args == "auto":
        notes.append(f"Megatron-LM consumer stage left out: {flags_source}")
    say(f"{plan.family.name}: {len(plan.entries)} MCore tensors, OUT {ckpt}")
    checks = [C.check_tensors(hf, reader, plan, progress)]
    if checks[0].metrics.get("structural_problems"):
        checks.append(C.CheckResult("logits", "-", False, message="skipped: OUT does not match IN's layout"))
    else:
        ids_BS = torch.randint(0, m.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
        with tempfile.TemporaryDirectory(prefix="validate-") as tmp:
            ref = C.Reference(hf, ids_BS, Path(tmp))
            checks += logit_checks(ref, layouts, Path(hf_dir), ckpt, dtype, Path(tmp), timeout, m.notes, flags)
            if vllm:
                vdtype = C.vllm_dtype(vllm_dtype_name, m, stored)
                say(f"exporting OUT with mcore2hf for vLLM ({vdtype})")
                rows, more = C.check_vllm(Path(mcore_dir), Path(hf_dir), ref, vdtype, vllm_memory,
                                          Path(tmp), timeout, "; ".join(m.notes))
                checks += rows
                notes += more
    return {"hf_dir": str(hf_dir), "mcore_dir": str(mcore_dir), "checkpoint": str(ckpt),
            "family": plan.family.name, "stored_dtype": _name(stored), "compute_dtype": dtype,
            "tokens": {"batch": batch, "seq_len": seq_len, "seed": seed},
            "layouts": [x.name for x in layouts], "notes": notes,
            "consumer": None if flags is None else {"flags": flags_source, "overrides": config_overrides(flags)},
            "checks": [c.to_json() for c in checks], "passed": all(c.passed for c in checks),
            "seconds": time.time() - t0}


def consumer_flags(source: Optional[str], mcore_root: Path, m, stored) -> tuple[Optional[str], str]:
    """The consumer stage's Megatron-LM flags and where they came from (see ``run``)."""
    from mapping.registry import FAMILIES

    if source is None:
        return None, "-"
    if source == "auto" and FAMILIES[m.family].megatron_lm_gap:
        return None, FAMILIES[m.family].megatron_lm_gap
    if source != "auto":
        if not Path(source).is_file():
            raise ValidateError(f"--megatron-args {source}: no such file (pass the MODEL_ARGS flags, one or "
                                "more per line)")
        return Path(source).read_text(), source
    written = mcore_root / ARGS_FILE
    if written.is_file():
        return written.read_text(), str(written)
    return "\n".join(flag_lines(megatron_args(m, stored))), "derived from config.json"


def logit_checks(ref: C.Reference, layouts, hf_dir: Path, ckpt: Path, dtype: str, scratch: Path,
                 timeout: float, caveats, flags: Optional[str] = None) -> list[C.CheckResult]:
    """One row per layout against transformers, the cross-layout row, and with ``flags`` one
    ``consumer`` row per layout (the Megatron-LM consumer computes in fp32)."""
    from runtime import megatron as rt

    ref32 = ref.logits(torch.float32)
    limits = (C.fp32_limits(ref32) if rt.DTYPES[dtype] == torch.float32 else
              C.noise_limits(ref32, C.metrics(ref.logits(rt.DTYPES[dtype]), ref32), dtype))
    results = layout_logits(layouts, hf_dir, ckpt, ref.ids_BS, dtype, scratch, timeout, flags)
    rows = [_logits_row("logits", results, lay.name, f"{lay.name} {dtype}", ref32, limits, caveats)
            for lay in layouts]
    if sum(isinstance(v, torch.Tensor) for n, v in results.items() if not n.startswith(CONSUMER)) > 1:
        rows.append(consistency(results, limits))
    if flags is not None:
        rows += [_logits_row("consumer", results, CONSUMER + lay.name, f"{lay.name} float32", ref32,
                             C.fp32_limits(ref32), caveats) for lay in layouts if lay.etp is None]
    return rows


def _logits_row(check: str, results: dict, name: str, target: str, ref32, limits, caveats) -> C.CheckResult:
    got = results.get(name, "no logits came back")
    if not isinstance(got, torch.Tensor):
        return C.CheckResult(check, target, False, message=got)
    return C.judge(check, target, C.metrics(got, ref32), limits, "; ".join(caveats))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def hf_dtype(hf) -> torch.dtype:
    from runtime import megatron as rt

    if any(i.scale for i in hf.tensors.values()):
        return torch.bfloat16
    return rt.DTYPES.get(str(hf.config.get("torch_dtype") or hf.config.get("dtype") or "float32"), torch.float32)


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


# --------------------------------------------------------------------------- report and CLI
def add_parser(sub) -> argparse.ArgumentParser:
    v = sub.add_parser("validate", help="prove OUT equivalent to IN (tensors, logits, layouts, vLLM)",
                       description="Prove that a Megatron-Core checkpoint (OUT) is a faithful conversion of an HF checkpoint (IN). Checks: bitwise tensor round trip, logits "
                       "against transformers at each layout, agreement across layouts, and optionally vLLM.",
                       epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("--hf-dir", required=True, help="the HF checkpoint OUT was converted from (IN)")
    v.add_argument("--mcore-dir", required=True, help="MCore root (latest_checkpointed_iteration.txt) "
                   "or a torch_dist directory (OUT)")
    v.add_argument("--tp", type=int, default=1, help="tensor parallel size of the main layout")
    v.add_argument("--ep", type=int, default=1, help="expert parallel size of the main layout")
    v.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the main layout")
    v.add_argument("--layouts", default="", help="more layouts, e.g. tp2,ep2,tp2ep2,pp2 (see below)")
    v.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="MCore compute dtype (auto: OUT's stored dtype); sets the limits")
    v.add_argument("--batch", type=int, default=4, help="sequences in the fixed token batch")
    v.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    v.add_argument("--seed", type=int, default=0, help="seed of the random token batch")
    v.add_argument("--vllm", action="store_true", help="also export OUT (mcore2hf) and compare vLLM's "
                   "prompt logprobs with transformers'")
    v.add_argument("--vllm-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="vLLM dtype (auto: OUT's; on CPU fp32 for GQA, bf16 for MLA)")
    v.add_argument("--vllm-memory", type=float, default=0.1,
                   help="vLLM gpu_memory_utilization (on CPU: fraction of the NUMA node's RAM)")
    v.add_argument("--timeout", type=float, default=1800, help="seconds per torchrun / vLLM launch")
    v.add_argument("--megatron-args", default="auto", metavar="FLAGS",
                   help="consumer stage: a file with the Megatron-LM model flags (MODEL_ARGS) you train "
                   "with; the model pretrain_gpt.py builds from them loads OUT strictly at each layout and "
                   "is compared with transformers (default: OUT/megatron_lm_args.txt, which hf2mcore writes)")
    v.add_argument("--no-consumer", action="store_true", help="skip the Megatron-LM consumer stage")
    v.add_argument("--json", default=None, metavar="REPORT", help="also write the full report as JSON")
    return v


def main(args) -> int:
    if args.batch < 1 or args.seq_len < 2:
        raise ValidateError("--batch must be >= 1 and --seq-len >= 2")
    report = run(args.hf_dir, args.mcore_dir, layouts=layouts_from(args.layouts, args.tp, args.ep, args.pp),
                 vllm=args.vllm, compute_dtype=args.dtype, batch=args.batch, seq_len=args.seq_len,
                 seed=args.seed, vllm_dtype_name=args.vllm_dtype, vllm_memory=args.vllm_memory,
                 timeout=args.timeout, megatron_args=None if args.no_consumer else args.megatron_args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(format_report(report))
    return 0 if report["passed"] else 1
