"""A role's "I can take work now" report: a small JSON file written once, read by whoever started it.

A file rather than a pipe or a port: it needs nothing from the parent but a path, so it works for a
process started by ``imagebus up``, by a supervisor, or checked by a Kubernetes startup probe.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def report_ready(path: Path | None, **facts: Any) -> None:
    """Write ``facts`` to ``path`` (nothing when None), atomically: a reader never sees half a file."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps({"pid": os.getpid(), **facts}))
    os.replace(partial, path)


def read_ready(path: Path) -> dict[str, Any] | None:
    """The facts of a ready report, or None while there is none."""
    try:
        facts = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return facts if isinstance(facts, dict) else {}


def withdraw_ready(path: Path | None) -> None:
    """Remove a report (before a role starts again, and when it stops)."""
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
