"""Symbolic second opinion (math-verify) under a hard time limit that cannot hang the caller.

What it does: `SymbolicChecker.equivalent(pred, ground_truth)` asks a long-lived worker
process (`python -m rl.reward._worker`) whether math-verify finds the two answers equal.
Two time limits guard it:
  - inside the worker, an interval timer interrupts Python-level work after `inner_s` and the
    worker answers "timeout" and lives on;
  - in the caller, a request that has no reply by its deadline (e.g. work stuck in C code,
    where signals are not delivered until it returns) gets the worker killed; a fresh one is
    started on the next request.
Only one request is ever in flight, so pipes never fill up and replies cannot be confused;
a concurrent caller waits for its turn only until its own deadline.
The worker is started lazily; until it has said "ready" a request waits at most until its
deadline and then gets None ("no opinion"). Call `warmup()` first for deterministic scores.
A process that forks (Ray, multiprocessing) gets its own worker: the owner pid is checked.
What it leaves out: the string rules (rl.reward.normalize) and the choice of when to ask
(rl.reward.scoring). Answers longer than `MAX_CHARS` are not sent (no opinion).
What breaks without it: math-verify's own timeouts use SIGALRM, which works only in the main
thread and cannot interrupt C code; a thread with a timeout would leave a runaway sympy
computation burning a core. A subprocess is the only limit that always holds.

Protocol (one JSON object per line): worker -> {"ready": true} once, then for each request
{"id", "pred", "gold"} -> {"id", "equal": bool | null, "error": str | null}.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

MAX_CHARS = 2000
_REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)


class SymbolicChecker:
    """A handle on one math-verify worker process; thread-safe, one request at a time."""

    def __init__(self, timeout_s: float = 0.75, inner_s: float = 0.55):
        self.timeout_s = timeout_s
        self.inner_s = inner_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner_pid = -1
        self._ready = False
        self._buf = b""
        self._next_id = 0
        self.kills = 0  # workers killed for missing a deadline (logged by the trainer)

    # -- process management -------------------------------------------------------------
    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "rl.reward._worker", "--inner-s", str(self.inner_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=str(_REPO_ROOT),
        )
        self._owner_pid = os.getpid()
        self._ready = False
        self._buf = b""

    def _ensure_started(self) -> None:
        alive = self._proc is not None and self._proc.poll() is None
        if not alive or self._owner_pid != os.getpid():
            self._start()

    def close(self) -> None:
        """Kill the worker (it is restarted on the next request)."""
        with self._lock:
            self._kill()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and self._owner_pid == os.getpid() and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        self._ready = False

    # -- reading with a deadline ----------------------------------------------------------
    def _read_line(self, deadline: float) -> dict | None:
        """Next JSON line from the worker, or None at the deadline or if the worker died."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            log.warning("math-verify worker wrote a non-protocol line %.80r; treating it as no reply", line)
            return None

    def _wait_ready(self, deadline: float) -> bool:
        if not self._ready:
            msg = self._read_line(deadline)
            self._ready = bool(msg and msg.get("ready"))
        return self._ready

    # -- public ---------------------------------------------------------------------------
    def warmup(self, timeout_s: float = 60.0) -> bool:
        """Start the worker and wait until it is ready; True when it is."""
        with self._lock:
            self._ensure_started()
            return self._wait_ready(time.monotonic() + timeout_s)

    def equivalent(self, pred: str, gold: str) -> bool | None:
        """math-verify's verdict on `pred` vs `gold` (box contents), or None when it has no
        opinion in time (worker starting, deadline missed, input too long, worker error)."""
        if len(pred) > MAX_CHARS or len(gold) > MAX_CHARS:
            return None
        deadline = time.monotonic() + self.timeout_s
        if not self._lock.acquire(timeout=self.timeout_s):
            return None
        try:
            return self._ask(pred, gold, deadline)
        finally:
            self._lock.release()

    def _ask(self, pred: str, gold: str, deadline: float) -> bool | None:
        """One request/reply under the lock; kills the worker when the deadline passes."""
        self._ensure_started()
        if not self._wait_ready(deadline):
            return None
        self._next_id += 1
        request = {"id": self._next_id, "pred": pred, "gold": gold}
        try:
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            log.warning("math-verify worker exited (code %s); restarting it", self._proc.poll())
            self._kill()
            return None
        reply = self._read_line(deadline)
        if reply is None or reply.get("id") != self._next_id:
            self.kills += 1
            log.warning("math-verify gave no verdict within %.2f s on pred=%.60r gold=%.60r; worker "
                        "killed (%d so far), no symbolic opinion for this sample",
                        self.timeout_s, pred, gold, self.kills)
            self._kill()
            return None
        if reply.get("error") not in (None, "timeout"):
            log.warning("math-verify failed on pred=%.60r gold=%.60r: %s", pred, gold, reply["error"])
        return reply.get("equal")


_DEFAULT: SymbolicChecker | None = None


def default_checker() -> SymbolicChecker:
    """The process-wide checker used by the `math_verify` reward."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = SymbolicChecker()
        atexit.register(_DEFAULT.close)
    return _DEFAULT
