"""The six top-level packages resolve into this repository (not into an installed
dependency that happens to ship a module of the same name), from the repo root and from
elsewhere (editable install)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["mapping", "kernels", "runtime", "convert", "rl", "tools"]


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


def test_wheel_ships_data_files(tmp_path):
    """Data the code opens at run time (data fixtures, run configs, the 671B config) is in the wheel."""
    import zipfile

    import shutil

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a clean copy: setuptools would reuse the checkout's build/ folder
    files = subprocess.run(["git", "ls-files"], cwd=root, check=True, capture_output=True, text=True).stdout
    for rel in files.split():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    for want in ("rl/data/fixtures/math_lighteval/data/train-00000-of-00001.parquet",
                 "rl/data/fixtures/expected/train.jsonl", "rl/configs/tiny.yaml",
                 "tools/configs/deepseek_v3_671b.json"):
        assert want in names, want


# Layering, lowest first: mapping and kernels (pure), the Megatron-Core / vLLM runtime, the
# conversion commands and checkpoint formats, rl, tools. Each imports only the layers below it.
MAY_IMPORT = {"mapping": set(), "kernels": set(), "runtime": {"mapping", "kernels"},
              "convert": {"mapping", "kernels", "runtime"}, "rl": {"mapping", "kernels", "runtime", "convert"},
              "tools": {"mapping", "kernels", "runtime", "convert", "rl"}}
# What rl and tools may use of convert: the formats' public API and the commands, no internals.
CONVERT_PUBLIC = {"convert", "convert.formats", "convert.hf2mcore", "convert.mcore2hf", "convert.comm",
                  "convert.progress"}
# The one upward edge: the trainer fabricates its default tiny model when none is configured.
EXCEPTIONS = {("rl/prepare.py", "tools.make_tiny")}


def _imports(path: Path):
    import ast

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield node.lineno, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                                if node.module == "convert"]


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_packages_import_only_the_layers_below(package):
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for lineno, names in _imports(path):
            for n in names:
                top = n.split(".")[0]
                if (rel, n) in EXCEPTIONS or top not in PACKAGES or top == package:
                    continue
                if top not in MAY_IMPORT[package]:
                    wrong.append(f"{rel}:{lineno} imports {n}")
                elif top == "convert" and package in ("rl", "tools") and n not in CONVERT_PUBLIC:
                    wrong.append(f"{rel}:{lineno} imports convert internal {n}; use convert.formats or a command")
    assert not wrong, wrong
