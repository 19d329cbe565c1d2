"""README blocks generated from the catalog and the settings table (never hand-edited)."""

from __future__ import annotations

import re
from collections.abc import Callable

from .catalog import markdown_table
from .config import settings_markdown
from .serving import limits_markdown

BLOCKS: dict[str, Callable[[], str]] = {
    "metrics": markdown_table,
    "settings": settings_markdown,
    "limits": limits_markdown,
}


def render(text: str) -> str:
    """Replace every `<!-- BEGIN name -->...<!-- END name -->` block with its generated body."""
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} [^\n]*-->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no generated block {name!r}")
        text = pattern.sub(r"\g<1>" + make().replace("\\", r"\\") + r"\g<2>", text)
    return text
