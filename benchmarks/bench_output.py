"""How every benchmark hands its result over: pretty JSON on stdout, and the same text in ``--json PATH``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit_json(result: dict[str, Any], path: Path | None) -> None:
    """Print ``result`` as indented JSON and, with ``path``, write the same text there (folders created)."""
    text = json.dumps(result, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
