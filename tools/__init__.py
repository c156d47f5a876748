"""Command-line tools (run as `python tools/NAME.py`); what they share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path | None, value: Any) -> None:
    """A tool's `--json` report: `value` as indented JSON at `path` (its folder made), nothing when `path` is None."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=1) + "\n")
