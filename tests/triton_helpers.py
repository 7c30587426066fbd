"""Running a Triton kernel test under the interpreter (``TRITON_INTERPRET=1``), on any machine.

The interpreter must be switched on before ``triton`` is imported, so each kernel test writes a
script that imports the kernel, runs its cases and prints a JSON report as its last line
(``kernel_type``: the kernel object's class name; ``mismatches``: case -> count), and runs it here
in a fresh interpreter.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_interpreted(script: str, timeout: int = 600) -> dict:
    """``script``'s JSON report, after checking it ran and the kernel really was interpreted."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", script, str(REPO)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["kernel_type"] == "InterpretedFunction"
    return report
