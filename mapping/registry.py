"""The family registry: the one list of supported families, and which one handles a config.json.

Every module in ``mapping/families/`` that defines ``FAMILY`` is a family: adding a family is
adding one file there (``register`` adds one from elsewhere, e.g. a test or a plugin). The
tiny-model presets (``tools/tiny_configs.py``), the tests and the README's family table
(``python -m convert families``, checked by ``tests/test_readme.py``) all read this list.
"""
from __future__ import annotations

import importlib
import pkgutil

from mapping import families as _families_pkg
from mapping.family import ConfigError, Family


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(_families_pkg.__path__), key=lambda i: i.name):
        family = getattr(importlib.import_module(f"mapping.families.{info.name}"), "FAMILY", None)
        if family is not None:
            if family.name in found:
                raise ValueError(f"mapping/families/{info.name}.py: family {family.name!r} is defined twice")
            found[family.name] = family
    return found


FAMILIES: dict[str, Family] = _discover()


def register(family: Family) -> None:
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    FAMILIES[family.name] = family


def family_for(hf_config: dict, source: str = "config.json") -> Family:
    """The family whose architecture (and ``matches``) fit ``hf_config``; a clear error otherwise."""
    archs = hf_config.get("architectures") or []
    found = [f for f in FAMILIES.values() if set(archs) & set(f.architectures) and f.matches(hf_config)]
    if len(found) == 1:
        return found[0]
    supported = sorted({a for f in FAMILIES.values() for a in f.architectures})
    if not found:
        raise ConfigError(f"{source}: unknown architecture {archs or '(none)'}; supported: "
                         f"{', '.join(supported)}. Add a family file under mapping/families/.")
    raise ConfigError(f"{source}: architecture {archs} matches several families "
                     f"{[f.name for f in found]}; make their `matches` predicates exclusive")
