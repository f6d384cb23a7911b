"""JAX's persistent compilation cache, on by default in a per-user folder.

A run's fixed cost is mostly compiling the same programs again (``benchmarks/startup.py``);
JAX can keep compiled programs on disk. ``import gflow`` calls ``configure()``, which
turns the cache on in

* the folder named by the environment variable ``GFLOW_COMPILATION_CACHE`` (``off``,
  ``0``, ``false`` or ``none`` turn it off), else
* ``$XDG_CACHE_HOME/gflow/jax`` (``~/.cache/gflow/jax``),

keeping every program whatever its compile time, up to ``MAX_BYTES`` on disk (least
recently used entries go first, under a file lock, so concurrent runs and test workers
can share it). It does nothing when JAX's cache was set up by the user
(``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``). ``gflow``'s commands take
``--compilation-cache DIR|off``.

A folder that cannot be created or written turns the cache off with a warning; an entry
that cannot be read (a damaged file) is compiled anew, with JAX's warning. Neither stops
a run. Entries are written whole or not at all (``_atomic_entries``), so a full disk or
a killed run leaves no truncated one behind. ``data_dir()`` is a sibling folder for
parsed copies of built-in data.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

__all__ = ["configure", "cache_dir", "data_dir", "ENV", "MAX_BYTES"]

ENV = "GFLOW_COMPILATION_CACHE"
MAX_BYTES = 2 << 30
_OFF = {"off", "0", "false", "none", "no"}
_ours: Path | None = None


def _default() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gflow" / "jax"


def data_dir() -> Path | None:
    """``$XDG_CACHE_HOME/gflow/data``: parsed copies of built-in data sets that are slow
    to parse (``gflow.data.mnist5k``), or ``None`` when it cannot be written."""
    path = _default().parent / "data"
    return None if _writable(path) else path


def cache_dir() -> Path | None:
    """The folder JAX's persistent cache uses now (``None``: off)."""
    import jax

    d = jax.config.jax_compilation_cache_dir
    return Path(d) if d and jax.config.jax_enable_compilation_cache else None


def _writable(path: Path) -> str | None:
    """``None`` when ``path`` is (made) a folder this process can write, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def configure(where: str | os.PathLike | None = None) -> Path | None:
    """Turn JAX's persistent compilation cache on in ``where`` (default: the module
    docstring's folder; ``"off"`` turns it off) and return the folder, or ``None`` when
    it is off. Without ``where``, a cache the user set up in JAX is left alone."""
    global _ours
    import jax

    if where is None:
        if jax.config.jax_compilation_cache_dir and _ours is None:
            return cache_dir()  # the user's own set-up
        where = os.environ.get(ENV) or _default()
    if str(where).strip().lower() in _OFF:
        _set(enable=False)
        return None
    path = Path(where).expanduser()
    if path == _ours and cache_dir() == path:
        return path  # already so (gflow's command line and run() may both ask)
    why = _writable(path)
    if why is not None:
        warnings.warn(
            f"the compilation cache folder {path} is not usable ({why}); compiling without "
            f"a cache (set {ENV} to another folder, or to 'off')",
            RuntimeWarning,
            stacklevel=2,
        )
        _set(enable=False)
        return None
    try:
        import filelock  # noqa: F401  (the LRU eviction's lock)

        max_bytes = MAX_BYTES
    except ImportError:  # no lock, no eviction: entries are only ever added
        max_bytes = -1
    _atomic_entries()
    _set(enable=True, jax_compilation_cache_dir=str(path),
         jax_persistent_cache_min_compile_time_secs=0.0,
         jax_persistent_cache_min_entry_size_bytes=0,
         jax_compilation_cache_max_size=max_bytes)  # fmt: skip
    _ours = path
    return path


def _atomic_entries() -> None:
    """JAX's file cache (jax 0.10's ``LRUCache.put``) writes an entry in place: a full
    disk or a process killed mid-write leaves a truncated entry, which every later run
    reads, warns about and compiles anew, and which is never rewritten (an existing key
    is kept). Here an entry is written to a temporary file and renamed into place,
    under the same lock, so it is whole or absent. Left as JAX's when its internals are
    not the expected ones."""
    try:
        from jax._src import lru_cache
    except ImportError:
        return
    cls = getattr(lru_cache, "LRUCache", None)
    suffix = getattr(lru_cache, "_CACHE_SUFFIX", None)
    atime = getattr(lru_cache, "_ATIME_SUFFIX", None)
    if cls is None or suffix is None or atime is None or getattr(cls.put, "_atomic", False):
        return
    original = cls.put

    def put(self, key: str, value: bytes) -> None:
        if not hasattr(self, "eviction_enabled") or not hasattr(self, "path"):
            return original(self, key, value)
        if not key:
            raise ValueError("key cannot be empty")
        if self.eviction_enabled and len(value) > self.max_size:
            return original(self, key, value)  # JAX warns and skips it
        path = self.path / f"{key}{suffix}"
        if self.eviction_enabled:
            self.lock.acquire(timeout=self.lock_timeout_secs)
        try:
            if path.exists():
                return
            self._evict_if_needed(additional_size=len(value))
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_bytes(value)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            if self.eviction_enabled:
                import time

                (self.path / f"{key}{atime}").write_bytes(time.time_ns().to_bytes(8, "little"))
        finally:
            if self.eviction_enabled:
                self.lock.release()

    put._atomic = True
    cls.put = put


def _set(enable: bool, **options) -> None:
    """Update JAX's cache options and let it set the cache up anew at the next compile
    (it reads them once)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", enable)
    for k, v in options.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
