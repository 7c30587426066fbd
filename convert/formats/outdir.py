"""Output directories that never look complete before they are.

A conversion writes ``OUT/.conversion.json`` (``status: in-progress``) first and its completion
marker last: ``latest_checkpointed_iteration.txt`` for MCore outputs, the safetensors index for
HF outputs. A directory that exists and is not one of ours is refused unless ``--overwrite``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

OWNER = ".conversion.json"
MARKER = "latest_checkpointed_iteration.txt"


class OutputError(ValueError):
    """The output location cannot be used; the message names it and says what to do."""


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def prepare(out: Path, *, overwrite: bool, kind: str, subdir: str = ".", fingerprint: str = "") -> bool:
    """Create ``out`` and mark it in progress. Returns True when ``out`` holds an unfinished
    attempt of the same conversion (same ``fingerprint``), which the caller then resumes."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is a file; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        owner = _read_owner(out)
        if owner and owner.get("fingerprint") == fingerprint and owner.get("status") == "in-progress":
            return True
        if owner is None and not overwrite:
            raise OutputError(f"{out}: exists, is not empty and was not written by this tool; "
                              "choose another --out or pass --overwrite")
        shutil.rmtree(out)
    try:
        (out / subdir).mkdir(parents=True, exist_ok=True)
        _write_json(out / OWNER, {"tool": kind, "status": "in-progress", "fingerprint": fingerprint})
    except OSError as err:
        raise OutputError(f"{out}: cannot write here ({err.strerror}); choose a writable --out") from err
    return False


def _read_owner(out: Path):
    try:
        return json.loads((out / OWNER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def writing(out: Path):
    """Turn the OS errors of writing into ``out`` (disk full, quota, read-only, permissions)
    into one-line ``OutputError``s; the output stays marked in progress."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{out}: no space left while writing {err.filename or 'output'}; free space "
                              "(or pick another --out) and re-run the same command to resume") from err
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise OutputError(f"{out}: cannot write ({err.strerror}); choose a writable --out") from err
        raise


def mark_complete(out: Path, iteration: str = "release", record: dict | None = None) -> None:
    """Write the completion marker; ``record`` (what was converted, e.g. ``mtp: absent``) joins
    the conversion record in ``OUT/.conversion.json``."""
    marker = out / MARKER
    tmp = marker.with_name(MARKER + ".tmp")
    tmp.write_text(iteration + "\n")
    os.replace(tmp, marker)
    status = json.loads((out / OWNER).read_text())
    _write_json(out / OWNER, dict(status, **(record or {}), status="complete"))


def record(root: str | Path) -> dict:
    """The conversion record of an output root ({} for checkpoints we did not write)."""
    return _read_owner(Path(root)) or {}


def finish(out: Path) -> None:
    status = json.loads((out / OWNER).read_text())
    _write_json(out / OWNER, dict(status, status="complete"))


def checkpoint_dir(root: str | Path) -> Path:
    """The torch_dist directory of an MCore output root (``iter_XXXXXXX`` or ``release``), or
    ``root`` itself if it already is one. Refuses incomplete conversions."""
    root = Path(root)
    owner = root / OWNER
    if owner.is_file() and json.loads(owner.read_text()).get("status") != "complete":
        raise OutputError(f"{root}: conversion did not finish ({OWNER} says in-progress); re-run it")
    if (root / "metadata.json").is_file():
        return root
    marker = root / MARKER
    if not marker.is_file():
        raise OutputError(f"{root}: no {MARKER}; not a complete Megatron checkpoint root "
                          "(interrupted conversion?); re-run hf2mcore")
    it = marker.read_text().strip()
    sub = root / ("release" if it == "release" else f"iter_{int(it):07d}")
    if not (sub / "metadata.json").is_file():
        raise OutputError(f"{sub}: missing or incomplete (no metadata.json)")
    return sub
