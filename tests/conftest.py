"""Session-wide test hygiene.

Every test starts from the environment the session started with. Code that runs in this process changes
os.environ as a side effect (vLLM-CPU's platform puts libgomp in LD_PRELOAD, conversions ask for huge
pages, launchers set MASTER_PORT), and every subprocess a later test starts inherits it: in a full session
that turned passing tests into failures (a child binding the port this process's store held).

`make test` runs the suite on two pytest-xdist workers (``-n 2 --dist loadgroup``). The machine has two cores
and the suite is mostly waiting (vLLM and Ray start-up, gloo rendezvous, process launches), so two workers share
them. Every test that starts a vLLM engine or a Ray cluster is in one group, "engines", so that at most one of
them runs at a time (each wants most of the memory it is given and both cores while it starts); every other
test stays with its module, so a module's fixtures are built once."""
import os

import pytest

ENGINES = ("vllm", "ray")


def _engines(item) -> bool:
    return any(item.get_closest_marker(m) for m in ENGINES)


def pytest_itemcollected(item):
    """The test's xdist group, set as it is collected (before xdist's own pytest_collection_modifyitems
    appends it to the test's id, which --dist loadgroup schedules by)."""
    item.add_marker(pytest.mark.xdist_group("engines" if _engines(item) else item.module.__name__))


def pytest_collection_modifyitems(config, items):
    """Under --dist loadgroup, the engines group first: it is the longest, and groups are handed out in
    the order their first test was collected (a stable sort keeps each module's order)."""
    if getattr(config.option, "loadgroup", False):
        items.sort(key=lambda item: not _engines(item))


@pytest.fixture(autouse=True)
def _session_environment():
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)
