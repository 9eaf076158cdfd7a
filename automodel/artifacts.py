"""Reusing generated folders (tiny models, synthetic data) when they were built the same way.

A builder records its arguments in ``.automodel_build.json`` after it finishes; with
``reuse=True`` a later call with the same arguments returns the folder untouched. The record is
written last, so an interrupted build is never mistaken for a complete one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECORD = ".automodel_build.json"


def _record(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "params": {k: params[k] for k in sorted(params)}}


def is_built(out_dir: str | Path, kind: str, params: dict[str, Any]) -> bool:
    """True when ``out_dir`` holds a finished build of ``kind`` with exactly ``params``."""
    path = Path(out_dir) / RECORD
    try:
        return json.loads(path.read_text()) == _record(kind, params)
    except (OSError, ValueError):
        return False


def mark_built(out_dir: str | Path, kind: str, params: dict[str, Any]) -> None:
    path = Path(out_dir) / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_record(kind, params), indent=1))
    tmp.replace(path)
