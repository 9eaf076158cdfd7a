"""Reusing generated folders (tiny models, synthetic data) when they were built the same way.

A builder records its arguments in ``.automodel_build.json`` after it finishes; with
``reuse=True`` a later call with the same arguments returns the folder untouched. Builders add
``code_version(__name__)`` (a hash of their module's or package's source) to their arguments, so
a folder built by older code (other default sizes, colours or fonts) is rebuilt rather than
reused. The record is written last, so an interrupted build is never mistaken for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

RECORD = ".automodel_build.json"


def _record(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "params": {k: params[k] for k in sorted(params)}}


def is_built(out_dir: str | Path, kind: str, params: dict[str, Any]) -> bool:
    """True when ``out_dir`` holds a finished build of ``kind`` with exactly ``params``."""
    return built_record(out_dir) == _record(kind, params)


def built_record(out_dir: str | Path) -> dict[str, Any] | None:
    """The build record of ``out_dir`` (kind and arguments), or ``None`` when it has none."""
    try:
        return json.loads((Path(out_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def mark_built(out_dir: str | Path, kind: str, params: dict[str, Any]) -> None:
    path = Path(out_dir) / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_record(kind, params), indent=1))
    tmp.replace(path)


def code_version(module_name: str) -> str:
    """A short hash of a module's source: part of a builder's recorded arguments.

    For a package (e.g. ``automodel.twins``), every ``.py`` and ``.jinja`` file under it is
    hashed, so a change to any of its modules or chat templates rebuilds what the package built.
    """
    module = sys.modules[module_name]
    digest = hashlib.sha256()
    if hasattr(module, "__path__"):
        root = Path(module.__file__).parent
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".jinja")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
    else:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]
