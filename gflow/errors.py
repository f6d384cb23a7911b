"""One-line error text: what gflow prints where a library below it raised pages."""

from __future__ import annotations

import warnings

__all__ = ["GflowWarning", "UntrustedCode", "one_line", "summarize", "warn"]


class UntrustedCode(ValueError):
    """A run folder's file holds code (a pickle) that gflow loads only when trusted."""


class GflowWarning(UserWarning):
    """A warning of gflow's own: printed as one line, ``gflow: warning: ...``."""


def warn(message: str, stacklevel: int = 2) -> None:
    """Warn with one line ``gflow: warning: message`` (a ``GflowWarning``: the usual
    ``warnings`` filters apply, e.g. ``-W error::gflow.errors.GflowWarning``)."""
    warnings.warn(one_line(message, 1000), GflowWarning, stacklevel=stacklevel + 1)


_plain_format = warnings.formatwarning


def _format(message, category, filename, lineno, line=None):
    if isinstance(category, type) and issubclass(category, GflowWarning):
        return f"gflow: warning: {message}\n"
    return _plain_format(message, category, filename, lineno, line)


if not getattr(warnings.formatwarning, "_gflow", False):
    _format._gflow = True
    warnings.formatwarning = _format


def one_line(message: str, limit: int = 400) -> str:
    """A message's first line, at most ``limit`` characters, `` ...`` where cut (a storage
    library's error can carry kilobytes of its own configuration)."""
    lines = str(message).strip().splitlines() or [""]
    first = lines[0]
    return first if len(first) <= limit and len(lines) == 1 else first[:limit] + " ..."


def summarize(e: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line"`` of an exception from a library (orbax, XLA)."""
    return f"{type(e).__name__}: {one_line(str(e), limit)}"
