"""FORMAT.md's known-answer vectors, for the tests that check them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

FORMAT_MD = Path(__file__).resolve().parent.parent / "FORMAT.md"


def format_vectors(name: str) -> list[dict[str, Any]]:
    """The vectors of FORMAT.md's json block marked ``<!-- vectors: name -->``."""
    pattern = rf"<!-- vectors: {re.escape(name)} -->\n```json\n(.*?)```"
    block = re.search(pattern, FORMAT_MD.read_text("utf-8"), re.S)
    assert block is not None, f"FORMAT.md has no json block of {name} vectors"
    vectors: list[dict[str, Any]] = json.loads(block.group(1))
    assert len(vectors) >= 2
    return vectors
