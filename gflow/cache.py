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

**Private.** Its entries are programs JAX runs, so the cache is this user's alone: the
folders gflow creates are 0700 and the entries it writes 0600, whatever the umask; an
existing folder owned by another user, or writable by group or others, is refused (a
one-line warning, and the run compiles without a cache). A folder that cannot be created
or written turns the cache off the same way; a blank folder name given on the command
line is an error, in the environment a warning. An entry that cannot be read (a damaged
file) is compiled anew, with JAX's warning. None of these stops a run. Entries are
written whole or not at all (``_atomic_entries``), so a full disk or a killed run leaves
no truncated one behind. ``data_dir()`` is a sibling folder for
parsed copies of built-in data.

**Traced programs.** JAX keeps compiled programs, but every process still traces its
functions anew: for the flow's ``diffeqsolve`` segments about a second each.
``Traced(fn, ...)`` keeps what tracing gives, the exported StableHLO (``jax.export``), in
a ``traced`` folder of gflow's cache, and a later process calls that (its compilation
then comes from the compilation cache). An entry's key is everything that could change
the program: the argument structure (with the static fields of the model, loss and
solver, which must print without memory addresses), the shapes and dtypes, the sources of
gflow, the versions of JAX and its libraries, the JAX options that change tracing, and
the device kind. Only code whose behaviour those determine is kept (the caller says so:
gflow's own models, losses and solvers); a model, loss or norm of the user's own is traced
each time, as its source is not in the key. A damaged entry, or one whose program fails
at its first call, is dropped and traced anew.
The compilation cache's switch turns both off; ``GFLOW_TRACED=off`` this one alone.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from gflow.errors import warn

__all__ = ["configure", "cache_dir", "data_dir", "traced_dir", "Traced", "ENV", "MAX_BYTES"]

ENV = "GFLOW_COMPILATION_CACHE"
MAX_BYTES = 2 << 30
_OFF = {"off", "0", "false", "none", "no"}
_ON = {"on", "1", "true", "yes"}
_ours: Path | None = None


def _default() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gflow" / "jax"


def data_dir() -> Path | None:
    """``$XDG_CACHE_HOME/gflow/data``: parsed copies of built-in data sets that are slow
    to parse (``gflow.data.mnist5k``), or ``None`` when it cannot be written or is not
    private (``_private``)."""
    path = _default().parent / "data"
    return None if _private(path) else path


def cache_dir() -> Path | None:
    """The folder JAX's persistent cache uses now (``None``: off)."""
    import jax

    d = jax.config.jax_compilation_cache_dir
    return Path(d) if d and jax.config.jax_enable_compilation_cache else None


def _private(path: Path) -> str | None:
    """``None`` when ``path`` is (made) a folder this process can write and no one else
    can: the folders it creates are 0700 whatever the umask, and an existing one must be
    this user's and not writable by group or others (another user could plant programs
    in it). Else why not."""
    try:
        missing = []
        here = path
        while not here.exists() and here != here.parent:
            missing.append(here)
            here = here.parent
        for folder in reversed(missing):
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError:  # made meanwhile by a concurrent run: checked below
                continue
            os.chmod(folder, 0o700)  # mkdir's mode passes through the umask
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            return "not a folder"
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            return f"owned by another user (uid {st.st_uid})"
        if st.st_mode & 0o022:
            return (f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}; "
                    f"chmod go-w {path} makes it private)")  # fmt: skip
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _unusable(where, why: str) -> None:
    warn(f"the compilation cache folder {where} is not usable ({why}); compiling without a "
         f"cache (set {ENV} or --compilation-cache to another folder, or to 'off')",
         stacklevel=3)  # fmt: skip
    _set(enable=False)


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
        if not str(where).strip():  # "   ": a folder named by blanks is no one's intent
            _unusable(repr(where), f"{ENV} is blank")
            return None
    elif not str(where).strip():
        raise ValueError(f"the compilation cache folder is blank ({str(where)!r}); give a "
                         "folder, or 'off'")  # fmt: skip
    if str(where).strip().lower() in _OFF:
        _set(enable=False)
        return None
    try:
        path = Path(where).expanduser()
    except RuntimeError as e:  # "~nosuchuser/...": no home to expand (issue 29 item 4)
        _unusable(where, str(e))
        return None
    if path == _ours and cache_dir() == path:
        return path  # already so (gflow's command line and run() may both ask)
    why = _private(path)
    if why is not None:
        _unusable(path, why)
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
                _write_private(tmp, value)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            if self.eviction_enabled:
                import time

                stamp = self.path / f"{key}{atime}"
                stamp.unlink(missing_ok=True)
                _write_private(stamp, time.time_ns().to_bytes(8, "little"))
        finally:
            if self.eviction_enabled:
                self.lock.release()

    put._atomic = True
    cls.put = put


def _write_private(path: Path, data: bytes) -> None:
    """``data`` into a new file ``path`` that only this user can read or write (0600),
    never through a link planted at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o600)  # fmt: skip
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _set(enable: bool, **options) -> None:
    """Update JAX's cache options and let it set the cache up anew at the next compile
    (it reads them once)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", enable)
    for k, v in options.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def traced_dir() -> Path | None:
    """The folder of traced programs (``Traced``): ``traced`` in gflow's compilation cache
    folder, or ``None`` when that cache is off, is one the user set up in JAX, or
    ``GFLOW_TRACED=off``."""
    if not traced_on():
        return None
    here = cache_dir()
    return None if (_ours is None or here != _ours) else here / "traced"


def traced_on() -> bool:
    """``GFLOW_TRACED``: unset, empty, on, 1, true or yes keep traced programs; off, 0,
    false, no or none do not; anything else is refused with a one-line warning (and
    none are kept)."""
    value = os.environ.get(TRACED_ENV, "").strip().lower()
    if value in _OFF:
        return False
    if value and value not in _ON:
        warn(f"{TRACED_ENV}={os.environ[TRACED_ENV]!r} is not one of on, off, 1, 0, true, "
             "false; traced programs are not kept")  # fmt: skip
        return False
    return True


_LIBRARIES = ("jax", "jaxlib", "diffrax", "equinox", "optimistix", "lineax", "flax", "numpy")
# JAX options that change what tracing produces
_OPTIONS = ("jax_enable_x64", "jax_numpy_dtype_promotion", "jax_default_matmul_precision",
            "jax_numpy_rank_promotion", "jax_enable_checks", "jax_debug_nans")  # fmt: skip
TRACED_KEEP = 256  # entries kept in the traced folder (the oldest go first)
TRACED_ENV = "GFLOW_TRACED"  # off: trace in every process (compiled programs still kept)


@functools.cache
def _code_fingerprint() -> str:
    """gflow's sources and the versions of the libraries that trace its programs."""
    import sys
    from importlib import metadata

    h = hashlib.sha256(sys.version.encode())
    for name in _LIBRARIES:
        try:
            h.update(f"{name}={metadata.version(name)};".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name}=?;".encode())
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


class Traced:
    """``fn`` (a function of array pytrees) jitted, with its traced program kept on disk.

    ``static``: what of ``fn`` its arguments do not show (e.g. the solver it closes over),
    as text; ``out_tree(*args)``: the structure of its outputs (a kept program returns
    their leaves); ``trusted(*args)``: whether everything the program depends on is gflow's
    or a library's (else it is only jitted, as ``eqx.filter_jit`` would). Every argument
    leaf must be an array. The module docstring says what the key holds."""

    def __init__(self, fn: Callable, *, static: str, out_tree: Callable, trusted: Callable):
        import equinox as eqx

        self.fn, self.static, self.out_tree, self.trusted = fn, static, out_tree, trusted
        self.plain = eqx.filter_jit(fn)
        self._memo: dict = {}

    def __call__(self, *args):
        import jax

        folder = traced_dir()
        leaves, treedef = jax.tree.flatten(args)
        if folder is None or not all(isinstance(a, jax.Array) for a in leaves):
            return self.plain(*args)
        avals = tuple((a.shape, a.dtype.name, bool(a.weak_type)) for a in leaves)
        memo = (treedef, avals, tuple(str(getattr(jax.config, o, None)) for o in _OPTIONS))
        call = self._memo.get(memo)
        fresh = call is None
        if fresh:
            call, path = self._load_or_trace(folder, treedef, leaves, avals, args)
            self._memo[memo] = call
        if call is self.plain:
            return self.plain(*args)
        try:
            out = call(*leaves)
        except Exception:  # noqa: BLE001 - a kept program that will not run here: trace
            if not fresh:
                raise
            if path is not None:
                path.unlink(missing_ok=True)
            self._memo[memo] = self.plain
            return self.plain(*args)
        return jax.tree.unflatten(self.out_tree(*args), out)

    def _key(self, treedef, avals) -> str | None:
        import jax

        text = f"{self.static}|{treedef}"
        if " at 0x" in text:  # an object printed by its address: no stable key
            return None
        device = jax.devices()[0]
        options = [f"{o}={getattr(jax.config, o, None)}" for o in _OPTIONS]
        parts = [_code_fingerprint(), text, repr(avals), *options, device.platform,
                 getattr(device, "device_kind", "")]  # fmt: skip
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _load_or_trace(self, folder: Path, treedef, leaves, avals, args):
        """``(callable, its entry's path)``: the kept program, or one exported now and
        written, or ``(self.plain, None)``."""
        import jax

        key = self._key(treedef, avals) if self.trusted(*args) else None
        if key is None:
            return self.plain, None
        path = folder / f"{key}.jaxexport"
        exported = None
        if path.is_file():
            try:
                exported = jax.export.deserialize(bytearray(path.read_bytes()))
            except Exception:  # noqa: BLE001 - damaged (or foreign): traced anew below
                exported = None
        if exported is None:

            def flat(*xs):
                return jax.tree.leaves(self.fn(*jax.tree.unflatten(treedef, xs)))

            try:
                exported = jax.export.export(jax.jit(flat))(*leaves)
                data = exported.serialize()
            except Exception:  # noqa: BLE001 - a program export cannot take: jit it only
                return self.plain, None
            _write(folder, path, data)
        return jax.jit(exported.call), path


def _write(folder: Path, path: Path, data: bytes) -> None:
    """``data`` into ``path`` whole (``trajectory.atomic_write``), keeping the newest
    ``TRACED_KEEP`` entries; a folder that cannot be written is passed over."""
    from gflow.trajectory import atomic_write

    try:
        # made private once (its parent, the cache, was checked private by configure)
        if not folder.is_dir() and _private(folder) is not None:
            return
        atomic_write(path, data, mode=0o600)
        entries = sorted(folder.glob("*.jaxexport"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-TRACED_KEEP]:
            old.unlink(missing_ok=True)
    except OSError:
        pass
