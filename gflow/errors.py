"""One-line error text: what gflow prints where a library below it raised pages."""

from __future__ import annotations

__all__ = ["one_line", "summarize"]


def one_line(message: str, limit: int = 400) -> str:
    """A message's first line, at most ``limit`` characters, `` ...`` where cut (a storage
    library's error can carry kilobytes of its own configuration)."""
    lines = str(message).strip().splitlines() or [""]
    first = lines[0]
    return first if len(first) <= limit and len(lines) == 1 else first[:limit] + " ..."


def summarize(e: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line"`` of an exception from a library (orbax, XLA)."""
    return f"{type(e).__name__}: {one_line(str(e), limit)}"
