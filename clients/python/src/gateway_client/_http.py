"""The HTTP library the installed `openai` SDK uses: `httpx2` for `openai>=3`, `httpx` before.

The two have the same API; a client handed to the SDK must come from the one it uses, so every
module here imports `httpx` from this one. Type checking is done against `httpx2`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import openai


def _sdk_major_version() -> int:
    match = re.match(r"\D*(\d+)", openai.__version__)
    return int(match.group(1)) if match else 0


if TYPE_CHECKING or _sdk_major_version() >= 3:
    import httpx2 as httpx
else:  # pragma: no cover - exercised only with openai<3 installed
    import httpx

__all__ = ["httpx"]
