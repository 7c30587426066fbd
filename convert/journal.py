"""Per-rank progress journals: what a rank has durably written, so a killed conversion resumes.

Each rank appends one JSON line per finished unit of work (an MCore tensor, a shard file) after
its bytes are flushed to the output file. On a re-run of the same command, the rank truncates
its output to the last journaled offset (dropping whatever a kill left half-written), skips the
journaled units and carries on. A torn last line (killed mid-write) is ignored. The journal
lives under the output's ``.progress/`` and is deleted when the conversion completes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def fingerprint(*parts) -> str:
    """Identity of a conversion: same inputs, options and rank count -> same fingerprint."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def input_identity(directory: Path) -> dict:
    """Names, sizes and mtimes of an input folder's files (cheap; no data read)."""
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(directory.iterdir())
            if p.is_file()}


class Journal:
    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.entries: list[dict] = []
        if resume and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    self.entries.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # torn last line from a kill: everything before it is valid
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(e) + "\n" for e in self.entries))
        self._f = open(path, "a")

    def append(self, entry: dict) -> None:
        self._f.write(json.dumps(entry) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
