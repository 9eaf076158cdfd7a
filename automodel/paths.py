"""Telling a local path from a Hugging Face hub id."""

from __future__ import annotations

import os


def is_local_path(name: str) -> bool:
    """True when ``name`` means a local file or folder rather than a hub id like ``org/name``.

    Hub ids are ``name`` or ``org/name``; anything that exists, or is path-shaped beyond that
    (``./x``, ``/x``, ``~/x``, ``a/b/c``), is meant as a local path, so a missing one is reported
    as missing instead of being looked up on the hub.
    """
    if os.path.exists(name):
        return True
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
