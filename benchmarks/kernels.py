"""gflow's kernels besides the GD step: quantities, the KKT residual, vmapped seeds, compile.

Sections (``--only a,b``; all by default):

- ``quantities``: every per-sample quantity (margins, normalised and smoothed margins,
  norm, log-loss) for N = 5,000 MNIST images: the default MLP (float64, binary labels
  even/odd) and the paper CNN (float32, 10 classes). Compiled call, median.
- ``kkt``: the (eps, delta)-KKT residual of the paper CNN (float64) over 1,000 images,
  every sample active, in a child process so that its peak memory (max RSS) is its own.
  Labels are the network's own predictions, so the data are separated at any
  parameters. With the per-example-gradient memory each Gram method would need.
- ``seeds``: K = 16 initialisations of the default MLP, 200 GD steps each: one vmapped
  ``lax.scan`` against 16 sequential ones (each compiled once, the best of 3).
- ``compile``: compile time of each jitted kernel (value-and-grad, the scanned GD chunk,
  quantities) and the wall time of the default ``gflow run`` (GD and flow to log t = 100,
  checks, plots) in a fresh process, twice.

    python benchmarks/kernels.py            # about 5 minutes on 2 CPU cores
    python benchmarks/kernels.py --quick    # smaller sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import machine, timeit, write_result
from flax import nnx

from gflow import data as D
from gflow.kkt import _layerwise_bytes, gram_matrix, kkt_residual
from gflow.models import build_model, paper_cnn, split_params
from gflow.objective import make_objective

ROWS: list[dict] = []


def row(section: str, name: str, **vals):
    ROWS.append(dict(section=section, name=name, **vals))
    shown = "  ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in vals.items()
    )
    print(f"{section:<10} {name:<52} {shown}", flush=True)


def mnist(n: int) -> D.Dataset:
    return D.sample(D.mnist5k(), n, seed=0) if n < 5000 else D.mnist5k()


def quantities(quick: bool):
    n = 500 if quick else 5000
    ds = mnist(n)
    binary = D.Dataset(x=ds.x, y=ds.y % 2, num_classes=2, name="mnist even/odd")
    mlp = build_model("mlp", ds.input_shape, 1, width=50, seed=0)
    cnn = paper_cnn(ds.input_shape, 10, dtype=jnp.float32, rngs=nnx.Rngs(params=0))
    for label, model, data, loss in (
        ("default MLP float64", mlp, D.normalize(binary, "unit"), "logistic"),
        ("paper CNN float32", cnn, ds, "ce"),
    ):
        obj, p = make_objective(model, data, loss)
        f = jax.jit(lambda p, o=obj: o.quantities(p))
        t = time.perf_counter()
        jax.block_until_ready(f(p))
        first = time.perf_counter() - t
        row("quantities", f"{label}, N = {obj.num_samples}", seconds=timeit(f, p), first_s=first)


def teacher_problem(n: int):
    """The paper CNN (float64, first-layer bias) on ``n`` images labelled by itself."""
    ds = mnist(n)
    model = paper_cnn(ds.input_shape, 10, rngs=nnx.Rngs(params=0))
    _, p = split_params(model)
    from gflow.models import apply

    graphdef, _ = split_params(model)
    y = np.asarray(jnp.argmax(apply(graphdef, p, jnp.asarray(ds.x)), axis=1))
    data = D.Dataset(x=ds.x, y=y, num_classes=10, name="mnist, teacher labels")
    return make_objective(model, data, "ce")


def kkt_child(n: int) -> dict:
    obj, p = teacher_problem(n)
    t = time.perf_counter()
    r = kkt_residual(obj, p, gap=None, chunk=128)
    first = time.perf_counter() - t
    t = time.perf_counter()
    r = kkt_residual(obj, p, gap=None, chunk=128)
    again = time.perf_counter() - t
    dim = sum(a.size for a in jax.tree.leaves(p))
    return dict(
        samples=n,
        params=int(dim),
        first_s=first,
        seconds=again,
        eps_rel=r.eps_rel,
        kkt_gap=r.kkt_gap,
        layerwise_bytes=_layerwise_bytes(obj, p, n),
        rows_bytes=8 * n * int(dim),
        max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )


def kkt(quick: bool):
    n = 200 if quick else 1000
    out = subprocess.run(
        [sys.executable, __file__, "--kkt-child", str(n)], capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    row("kkt", f"paper CNN float64, {n} samples, all active", **r)
    # the per-example-gradient method on a few samples, for the ratio
    m = 32 if quick else 64
    obj, p = teacher_problem(m)
    for method in ("rows", "layers"):
        gram_matrix(obj, p, method=method, chunk=m)
        t = time.perf_counter()
        gram_matrix(obj, p, method=method, chunk=m)
        row("kkt", f"Gram matrix, {m} samples, method={method}", seconds=time.perf_counter() - t)


def seed_timing(k: int, steps: int, ds: D.Dataset) -> tuple[float, float, float]:
    """``(sequential s, vmapped s, max |difference|)`` of k default-MLP GD runs on ``ds``:
    one ``lax.scan`` of ``steps`` steps per seed, against one ``vmap`` of it."""
    inits = [
        split_params(build_model("mlp", ds.input_shape, 1, width=50, seed=s))[1] for s in range(k)
    ]
    obj, _ = make_objective(build_model("mlp", ds.input_shape, 1, width=50), ds, "logistic")

    def train(p):
        def body(p, _):
            g = obj.grad_log_loss(p)
            return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), None

        return jax.lax.scan(body, p, None, length=steps)[0]

    one = jax.jit(train)
    many = jax.jit(jax.vmap(train))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *inits)
    for _ in range(2):  # alternate, best of both rounds
        t_seq = timeit(lambda: [one(p) for p in inits], reps=3)
        t_vec = timeit(many, stacked, reps=3)
    together = jax.tree.leaves(many(stacked))
    same = max(
        float(jnp.abs(a - b[i]).max())
        for i, p in enumerate(inits)
        for a, b in zip(jax.tree.leaves(one(p)), together, strict=True)
    )
    return t_seq, t_vec, same


def seeds(quick: bool):
    k, steps = (4, 20) if quick else (16, 200)
    ds = D.normalize(D.sample(D.keep_classes(D.mnist5k(), (0, 1)), 300, seed=0), "unit")
    t_seq, t_vec, same = seed_timing(k, steps, ds)
    row("seeds", f"{k} seeds x {steps} GD steps, sequential", seconds=t_seq)
    row(
        "seeds",
        f"{k} seeds x {steps} GD steps, vmapped",
        seconds=t_vec,
        speedup=t_seq / t_vec,
        max_abs_diff=same,
    )


def compile_times(quick: bool):
    ds = D.normalize(D.sample(D.keep_classes(D.mnist5k(), (0, 1)), 300, seed=0), "unit")
    mlp_obj, mlp_p = make_objective(build_model("mlp", ds.input_shape, 1, width=50), ds, "logistic")
    big = mnist(200 if quick else 1000)
    cnn_obj, cnn_p = make_objective(
        paper_cnn(big.input_shape, 10, dtype=jnp.float32, rngs=nnx.Rngs(params=0)), big, "ce"
    )
    for label, obj, p in (("default MLP", mlp_obj, mlp_p), ("paper CNN f32", cnn_obj, cnn_p)):

        def gd(q, _, o=obj):
            return jax.tree.map(lambda a, g: a - 1e-3 * g, q, o.grad_log_loss(q)), None

        kernels = {
            "value_and_grad": jax.jit(lambda p, o=obj: o.value_and_grad(p)),
            "quantities": jax.jit(lambda p, o=obj: o.quantities(p)),
            "GD scan of 10 steps": jax.jit(lambda p, gd=gd: jax.lax.scan(gd, p, None, 10)[0]),
        }
        for name, f in kernels.items():
            t = time.perf_counter()
            f.lower(p).compile()
            row("compile", f"{label}: {name}", seconds=time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "gflow", "run", "--no-progress"]
        cmd += ["--log-t-max", "10"] if quick else []
        for i in range(2):
            t = time.perf_counter()
            subprocess.run(cmd + ["--out", f"{tmp}/r{i}"], check=True, capture_output=True)
            row(
                "compile",
                f"whole default `gflow run` (GD + flow), process {i + 1}",
                seconds=time.perf_counter() - t,
                command=" ".join(cmd[1:]),
            )


SECTIONS = {"quantities": quantities, "kkt": kkt, "seeds": seeds, "compile": compile_times}


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--kkt-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kkt_child is not None:
        print(json.dumps(kkt_child(args.kkt_child), default=float))
        return
    print(machine())
    for name in args.only.split(","):
        if name not in SECTIONS:
            ap.error(f"unknown section {name!r}; expected some of {','.join(SECTIONS)}")
        SECTIONS[name](args.quick)
    out = write_result(
        "kernels" + ("-quick" if args.quick else ""), dict(args=vars(args), rows=ROWS)
    )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
