"""The five top-level packages resolve into this repository (not into an installed
dependency that happens to ship a module of the same name), from the repo root and from
elsewhere (editable install)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["mapping", "convert", "kernels", "rl", "tools"]


@pytest.mark.parametrize("cwd", [ROOT, Path("/")])
def test_packages_resolve_into_repo(cwd):
    code = "import importlib.util as u; print('\\n'.join(u.find_spec(n).origin for n in %r))" % PACKAGES
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    origins = out.stdout.split()
    assert len(origins) == len(PACKAGES)
    for name, origin in zip(PACKAGES, origins):
        assert Path(origin).resolve() == ROOT / name / "__init__.py", (name, origin)


def test_no_installed_distribution_ships_these_names():
    from importlib.metadata import distributions

    clashes = []
    for dist in distributions():
        top = (dist.read_text("top_level.txt") or "").split()
        clashes += [(dist.metadata["Name"], n) for n in top if n in PACKAGES]
    assert [c for c in clashes if c[0] != "mcore-bridge-rl"] == []
