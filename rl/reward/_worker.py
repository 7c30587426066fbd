"""The math-verify worker process behind rl.reward.symbolic (run as `python -m rl.reward._worker`).

What it does: limits its own memory (`--max-memory-mb`), imports math-verify, says ready,
then answers one JSON request per line with math-verify's verdict, interrupting Python-level
work after `--inner-s` seconds.
What it leaves out: the hard limit (the caller kills this process when a reply is late).
What breaks without it: the "math_verify" reward has no process to ask. It is kept out of
`rl.reward.__init__` so that `-m` runs it as a fresh module.
"""

from __future__ import annotations

import json
import os
import sys


class _Interrupted(BaseException):
    """Raised by the interval timer; a BaseException so that libraries' `except Exception`
    handlers cannot turn a timeout into a verdict."""


def _verdict(pred: str, gold: str, inner_s: float) -> dict:
    import signal

    from math_verify import parse, verify

    def on_timer(signum, frame):
        raise _Interrupted()

    signal.signal(signal.SIGALRM, on_timer)
    signal.setitimer(signal.ITIMER_REAL, inner_s)  # 0 means no timer
    try:
        gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
        pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None)
        equal = bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
        return {"equal": equal, "error": None}
    except _Interrupted:
        return {"equal": None, "error": "timeout"}
    except Exception as exc:  # reported to the caller in the reply, never dropped
        return {"equal": None, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


_WARMUP = (("1", "1"), ("(x+1)^2", "x^2+2x+1"), ("0.25", "\\frac14"), ("2\\sqrt2", "\\sqrt8"),
           ("(-\\infty, 3]", "(-\\infty,3]"), ("\\{1,2\\}", "\\{2,1\\}"), ("x=5", "5"),
           ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
           ("\\text{(A)}", "A"), ("10\\%", "0.1"), ("\\sin(\\pi/6)", "\\frac12"))


def _worker_main(inner_s: float, max_memory_mb: int) -> None:
    import logging
    import resource

    # A runaway big-integer computation gets MemoryError here instead of swapping the machine.
    limit = max_memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # The protocol gets a private copy of stdout; fd 1 itself now points at stderr, so nothing a
    # library prints (from Python or from C) can corrupt the protocol.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import math_verify  # noqa: F401  (import before saying ready)

    # First uses load the LaTeX grammar and sympy's lazily imported solvers (~0.3 s each time a
    # new kind appears): exercise each kind once before saying ready, with no time limit.
    for pred, gold in _WARMUP:
        _verdict(pred, gold, 0.0)
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            verdict = _verdict(req["pred"], req["gold"], inner_s)
        except _Interrupted:  # the timer fired between the verdict and its cancellation
            verdict = {"equal": None, "error": "timeout"}
        reply = {"id": req["id"], **verdict}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="math-verify worker (spoken to over stdin/stdout).")
    ap.add_argument("--inner-s", type=float, default=0.55, help="per-request soft time limit (s)")
    ap.add_argument("--max-memory-mb", type=int, default=1024, help="address-space limit of the worker")
    args = ap.parse_args()
    _worker_main(args.inner_s, args.max_memory_mb)
