"""The patch record and the probe runner shared by ``megatron_core`` and ``vllm``.

A ``Patch`` says what upstream code it works around (package and version, file, symptom), how it
is applied and how to learn, cheaply and *without* the patch, whether the installed upstream still
has the defect (``still_needed``). Probes run in a fresh Python process (``run_probe``): the
process under test may already be patched, and a probe may hang or crash by design (that is the
defect). A probe prints lines ``PROBE <patch> DEFECT|FIXED <detail>``; anything else is a broken
probe and raises ``ProbeError`` (never read as "fixed").
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
SCOPES = ("process", "vllm-model", "vllm-reload")


@dataclass(frozen=True)
class Patch:
    """One workaround for one upstream defect."""
    name: str
    """Registry key (``runtime.patches.apply([name])``)."""
    upstream: str
    """Package and the version whose defect this is, as pip names it: "megatron-core 0.16.1"."""
    where: str
    """The upstream file (and symbol) at fault."""
    symptom: str
    """What goes wrong without the patch."""
    apply: Callable
    """``scope`` "process": ``apply()``, idempotent; "vllm-model": ``apply(model) -> modules
    touched`` at engine start-up; "vllm-reload": ``apply(model) -> [undo actions]`` before each
    weight update, the actions run when the update ends."""
    still_needed: Callable[[], bool]
    """Probe, run without the patch: True while the installed upstream still has the defect."""
    scope: str
    """One of ``SCOPES`` (see ``apply``)."""
    applied_by: str
    """The call site that applies it, and when."""
    remove_when: str
    """The upstream change that makes it unnecessary (the probe then answers False)."""

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"patch {self.name!r}: scope {self.scope!r} is not one of {SCOPES}")


class ProbeError(RuntimeError):
    """A probe neither reproduced the defect nor showed it fixed: the probe itself needs fixing."""


def run_probe(argv: list[str], timeout: float = 300.0) -> dict[str, tuple[bool, str]]:
    """Run ``python <argv>`` from the repository root with CUDA hidden (the probes are about
    CPU behaviour, whatever the machine); return ``{patch: (defect, detail)}`` from its
    ``PROBE`` lines."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, *argv]
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise ProbeError(f"probe {' '.join(argv[:3])} did not finish in {timeout:.0f} s") from err
    found = {}
    for line in r.stdout.splitlines():
        parts = line.split(" ", 3)
        if len(parts) >= 3 and parts[0] == "PROBE" and parts[2] in ("DEFECT", "FIXED"):
            found[parts[1]] = (parts[2] == "DEFECT", parts[3] if len(parts) > 3 else "")
    if not found:
        raise ProbeError(f"probe {' '.join(argv[:3])} printed no PROBE line (exit {r.returncode}); "
                         f"stdout: {r.stdout[-1500:]!r}; stderr: {r.stderr[-3000:]}")
    return found


def probe_one(name: str, argv: list[str], timeout: float = 300.0) -> bool:
    """``run_probe`` for a probe that answers about one patch."""
    found = run_probe(argv, timeout)
    if name not in found:
        raise ProbeError(f"probe for {name!r} answered about {sorted(found)} only")
    return found[name][0]
