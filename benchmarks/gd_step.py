"""One full-batch GD step: gflow's jitted step against PyTorch's, alternating A/B in one run.

Models: the paper's MNIST CNN (C32(5x5)-pool-C64(3x3)-pool-F1024-F10, first-layer bias) on
a batch of 1,000 images (cross-entropy), and gflow run's default MLP (300 unit-norm images,
width 50, logistic loss). Each in float32 and float64. Rows:

- gflow, one jitted value-and-grad + update per call (parameters donated);
- gflow, ``--scan`` steps inside one ``lax.scan`` (no host round trip), per step;
- PyTorch eager (same layout, ``reduction="sum"``, SGD), per step.

The A/B runs alternate, one timed step each, ``--reps`` times; the table gives medians,
gflow / torch ratios, and GFLOP/s (XLA's cost analysis) against a jitted matrix product
measured in the same run (``--ceiling`` size).

    python benchmarks/gd_step.py            # full
    python benchmarks/gd_step.py --quick    # fewer reps, smaller batch
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import classification_data, flops_of, machine, write_result
from torch_reference import torch_step_fn

from gflow import data as D
from gflow.models import build_model, paper_cnn
from gflow.objective import make_objective

LR = 1e-3


def problems(batch: int, dtype):
    from flax import nnx

    ds = classification_data(batch, (28, 28, 1), 10, np.float32)
    cnn = paper_cnn((28, 28, 1), 10, dtype=dtype, rngs=nnx.Rngs(params=0))
    yield "paper CNN", "paper-cnn", make_objective(cnn, ds, "ce"), ds
    mlp_ds = D.normalize(D.sample(D.keep_classes(D.mnist5k(), (0, 1)), 300, seed=0), "unit")
    mlp = build_model("mlp", mlp_ds.input_shape, 1, width=50, dtype=dtype)
    yield "default MLP", "mlp", make_objective(mlp, mlp_ds, "logistic"), mlp_ds


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--scan", type=int, default=10)
    ap.add_argument("--ceiling", type=int, default=4096)
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 10)
    batch = 200 if args.quick else 1000
    n = 1024 if args.quick else args.ceiling
    print(machine())
    ceil = {}
    for name, dt in (("float32", jnp.float32), ("float64", jnp.float64)):
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dt)
        f = jax.jit(lambda a, b: a @ b)
        jax.block_until_ready(f(a, a))
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            jax.block_until_ready(f(a, a))
            ts.append(time.perf_counter() - t)
        ceil[name] = 2 * n**3 / min(ts) / 1e9
        print(f"ceiling: {n}^3 matmul {name}: {ceil[name]:.1f} GFLOP/s")
    rows = []
    for name, dt in (("float32", jnp.float32), ("float64", jnp.float64)):
        for label, kind, (obj, p0), ds in problems(batch, dt):
            # The objective is an argument, as in run_gd (not a constant XLA could fold).
            def step(params, obj):
                g = obj.grad_log_loss(params)
                return jax.tree.map(lambda p, v: p - LR * v, params, g)

            one = jax.jit(step, donate_argnums=0)
            many = jax.jit(
                lambda p, obj: jax.lax.scan(
                    lambda q, _: (step(q, obj), None), p, None, length=args.scan
                )[0]
            )
            fl = flops_of(jax.jit(lambda p, o: o.value_and_grad(p)), p0, obj)
            y = ds.y_signed if kind == "mlp" else ds.y
            t_step = torch_step_fn(kind, np.asarray(ds.x), y, name)
            params = jax.tree.map(jnp.copy, p0)
            params = jax.block_until_ready(one(params, obj))
            params = jax.block_until_ready(many(params, obj))
            if t_step is not None:
                t_step()
            a_t, s_t, b_t = [], [], []
            for _ in range(reps):  # alternate A / B
                t = time.perf_counter()
                params = jax.block_until_ready(one(params, obj))
                a_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                params = jax.block_until_ready(many(params, obj))
                s_t.append((time.perf_counter() - t) / args.scan)
                if t_step is not None:
                    t = time.perf_counter()
                    t_step()
                    b_t.append(time.perf_counter() - t)
            r = dict(
                model=label,
                dtype=name,
                batch=int(obj.num_samples),
                flops=fl,
                gflow_step_s=float(np.median(a_t)),
                gflow_scan_step_s=float(np.median(s_t)),
                torch_step_s=float(np.median(b_t)) if b_t else None,
                ceiling_gflops=ceil[name],
            )
            r["gflops"] = fl / r["gflow_scan_step_s"] / 1e9
            r["fraction_of_ceiling"] = r["gflops"] / ceil[name]
            r["ratio_to_torch"] = r["gflow_scan_step_s"] / r["torch_step_s"] if b_t else None
            rows.append(r)
            tt = f"{r['torch_step_s'] * 1e3:9.2f} ms" if b_t else "      n/a"
            ratio = f"{r['ratio_to_torch']:.2f}x" if b_t else "n/a"
            print(
                f"{label:<12} {name}  batch {r['batch']:>5}: "
                f"gflow {r['gflow_step_s'] * 1e3:9.2f} ms, "
                f"scanned {r['gflow_scan_step_s'] * 1e3:9.2f} ms, torch {tt}; gflow/torch {ratio}; "
                f"{r['gflops']:.1f} GFLOP/s = {100 * r['fraction_of_ceiling']:.0f}% of ceiling",
                flush=True,
            )
    out = write_result(
        "gd_step" + ("-quick" if args.quick else ""),
        dict(args=vars(args), ceiling_gflops=ceil, rows=rows),
    )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
