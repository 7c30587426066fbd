"""The README's command reference agrees with each command's --help, and its runnable example
block runs as written (on a fabricated tiny model, in a scratch folder)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block_after(heading: str) -> list[str]:
    section = README.split(heading, 1)[1]
    body = re.search(r"```(?:text|bash)\n(.*?)```", section, re.S).group(1)
    lines, cur = [], ""
    for raw in body.splitlines():  # join continuation lines that start with spaces
        if raw.startswith(" ") and cur:
            cur += " " + raw.strip()
        else:
            if cur:
                lines.append(cur)
            cur = raw.strip()
    if cur:
        lines.append(cur)
    return [ln for ln in lines if ln and not ln.startswith("#")]


def command_of(line: str) -> list[str]:
    words = shlex.split(line)
    if words[:2] == ["python", "-m"]:
        mod = words[2]
        sub = [words[3]] if len(words) > 3 and not words[3].startswith(("-", "[")) else []
        return [sys.executable, "-m", mod, *sub]
    if words[0] == "python":
        return [sys.executable, words[1]]
    raise AssertionError(f"unexpected README command: {line}")


REFERENCE = block_after("## Command reference")


@pytest.mark.parametrize("line", REFERENCE, ids=[ln.split("[")[0][:40] for ln in REFERENCE])
def test_reference_flags_exist_in_help(line):
    cmd = command_of(line)
    out = subprocess.run([*cmd, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line)):
        assert flag in out.stdout, f"{flag} is in the README but not in `{' '.join(cmd[1:])} --help`"


@pytest.mark.slow
def test_example_block_runs_as_written(tmp_path):
    for line in block_after("## Try it"):
        cmd = shlex.split(line)
        cmd[0] = sys.executable if cmd[0] == "python" else cmd[0]
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, f"{line}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"


def test_family_table_is_the_registry():
    """The README's family table is what `python -m convert families` prints from mapping/families/."""
    from convert.__main__ import families_table

    table = families_table()
    assert table in README, "README's family table is stale: paste `python -m convert families` into it"


def test_every_family_has_its_published_shapes_and_a_tiny_preset():
    """One family list: each registered family names published checkpoints the zoo converts (a
    fixture per name, read by that family), and tools.make_tiny has a preset for it."""
    import json

    from mapping.registry import FAMILIES, family_for
    from tools.tiny_configs import FAMILIES as PRESETS

    fixtures = ROOT / "tests" / "fixtures" / "published"
    named = {}
    for fam in FAMILIES.values():
        assert fam.published, f"{fam.name}: no published checkpoint named (Family.published)"
        for repo in fam.published:
            cfg = json.loads((fixtures / repo.split("/")[-1] / "config.json").read_text())
            assert family_for(cfg).name == fam.name, repo
            named[repo.split("/")[-1]] = fam.name
    assert sorted(named) == sorted(p.name for p in fixtures.iterdir() if p.is_dir())
    assert sorted(PRESETS) == sorted(FAMILIES)
