"""Accelerator benchmark: gflow's hot kernels against the device's own matrix ceiling and
against PyTorch, in one process (run by ``benchmarks/gpu.sh``; runs on CPU too).

Sections (each prints its rows; a failing section is reported and the rest go on):

1. ceiling: a jitted n x n x n matrix product in float32 (full precision), float64, bf16.
2. paper CNN (C32(5x5)-pool-C64(3x3)-pool-F1024-F10, bias in the first layer, L = 4):
   one full-batch value-and-grad + update step on a full-MNIST-sized batch (60,000
   images), float32 and float64, convolutions as im2col + matmul and as XLA's
   convolution; PyTorch's equivalent step alternating with it (float32, TF32 off).
3. VGG-16 (L = 14) on a CIFAR-10-shaped batch, both convolution forms, and PyTorch.
4. seeds: K initialisations of the default MLP trained by GD in one vmapped scan
   against K sequential scans.
5. flow: ``run_flow`` with gflow run's default integrator on a default-sized problem
   (300 digits 0/1, width 50) to log t = 100, float64.

FLOPs come from XLA's cost analysis of the compiled step. float32 runs use
``jax_default_matmul_precision = "highest"`` (no TF32), like the PyTorch reference.

    python benchmarks/gpu_bench.py            # full sizes (an accelerator)
    python benchmarks/gpu_bench.py --quick    # small sizes, a CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gflow  # noqa: E402,F401  (float64 on)
from gflow import data as D  # noqa: E402
from gflow.models import paper_cnn, vgg16  # noqa: E402
from gflow.objective import make_objective  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import classification_data, flops_of, timeit  # noqa: E402
from torch_reference import torch_step  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
ROWS: list[dict] = []


def row(section, name, seconds, flops=float("nan"), ceiling=float("nan"), **extra):
    r = dict(section=section, name=name, seconds=seconds, gflops=flops / seconds / 1e9)
    r["fraction_of_ceiling"] = r["gflops"] / ceiling if ceiling == ceiling else float("nan")
    r.update(extra)
    ROWS.append(r)
    frac = r["fraction_of_ceiling"]
    print(
        f"{section:<8} {name:<44} {seconds * 1e3:10.2f} ms  {r['gflops']:9.1f} GFLOP/s"
        + (f"  {100 * frac:5.1f}% of ceiling" if frac == frac else "")
        + "".join(f"  {k}={v}" for k, v in extra.items()),
        flush=True,
    )
    return r


def ceiling(n):
    out = {}
    for dt in (jnp.float32, jnp.float64, jnp.bfloat16):
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dt)
        f = jax.jit(lambda a, b: a @ b)
        s = timeit(f, a, a)
        name = jnp.dtype(dt).name
        out[name] = 2 * n**3 / s / 1e9
        row("ceiling", f"matmul {n}^3 {name}", s, 2 * n**3)
    return out


def gd_step_fn(obj, lr=1e-3):
    def step(params):
        ell, g = obj.value_and_grad(params)
        return jax.tree.map(lambda p, v: p - lr * v, params, g), ell

    return jax.jit(step, donate_argnums=0)


def network_steps(section, build, n, shape, ceil, reps, torch_kind):
    ds = classification_data(n, shape, 10, np.float32)
    for dt in (jnp.float32, jnp.float64):
        for impl in ("im2col", "xla"):
            model = build(shape, 10, dtype=dt, conv_impl=impl, rngs=nnx.Rngs(params=0))
            obj, p0 = make_objective(model, ds, "ce")
            step = gd_step_fn(obj)
            fl = flops_of(jax.jit(lambda p, o=obj: o.value_and_grad(p)), p0)
            t0 = time.perf_counter()
            jax.block_until_ready(step(jax.tree.map(jnp.copy, p0)))
            compile_s = time.perf_counter() - t0
            params = jax.tree.map(jnp.copy, p0)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                params, ell = step(params)
                jax.block_until_ready(ell)
                ts.append(time.perf_counter() - t)
            name = jnp.dtype(dt).name
            row(
                section,
                f"gflow {impl} {name} batch {n}",
                float(np.median(ts)),
                fl,
                ceil.get(name, float("nan")),
                first_call_s=round(compile_s, 2),
            )
            if dt == jnp.float32 and impl == "im2col":
                ts_torch = torch_step(torch_kind, np.asarray(ds.x, np.float32), ds.y, reps)
                if ts_torch is not None:
                    row(section, f"torch float32 batch {n}", ts_torch, fl, ceil["float32"])


def seeds(k, steps, ceil):
    from kernels import seed_timing

    ds = D.normalize(D.sample(D.keep_classes(D.digits(), (0, 1)), 300, seed=0), "unit")
    t_seq, t_vec, _ = seed_timing(k, steps, ds)
    row("seeds", f"{k} seeds x {steps} GD steps, sequential", t_seq)
    row("seeds", f"{k} seeds x {steps} GD steps, vmapped", t_vec, speedup=round(t_seq / t_vec, 2))


def flow(log_t_max):
    from gflow.dynamics import run_flow
    from gflow.models import build_model

    ds = D.normalize(D.sample(D.keep_classes(D.digits(), (0, 1)), 300, seed=0), "unit")
    obj, p0 = make_objective(build_model("mlp", ds.input_shape, 1, width=50), ds, "logistic")
    for solver, kw in (
        ("rk4", dict(cfl=0.9, rtol=1e-4, atol=1e-7)),
        ("tsit5", dict(rtol=1e-4, atol=1e-7)),
    ):
        t = time.perf_counter()
        tr = run_flow(obj, p0, solver=solver, log_t_max=log_t_max, saves=26, **kw)
        s = time.perf_counter() - t
        row(
            "flow",
            f"{solver} {kw.get('cfl', '')} to log t {log_t_max:g}",
            s,
            evals=int(tr["grad_evals"][-1]),
            status=tr.status,
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated sections")
    args = ap.parse_args()
    q = args.quick
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    sections = {
        "ceiling": lambda: None,
        "paper-cnn": lambda: network_steps(
            "cnn", paper_cnn, 256 if q else 60_000, (28, 28, 1), ceil, 3 if q else 10, "paper-cnn"
        ),
        "vgg16": lambda: network_steps(
            "vgg16", vgg16, 8 if q else 256, (32, 32, 3), ceil, 3 if q else 10, "vgg16"
        ),
        "seeds": lambda: seeds(4 if q else 16, 20 if q else 200, ceil),
        "flow": lambda: flow(10.0 if q else 100.0),
    }
    only = set(args.only.split(",")) if args.only else set(sections)
    ceil = {}
    try:
        ceil = ceiling(512 if q else 8192)
    except Exception:
        traceback.print_exc()
    for name, fn in sections.items():
        if name in only and name != "ceiling":
            try:
                fn()
            except Exception:
                print(f"section {name} failed:")
                traceback.print_exc()
    rec = dict(
        device=dev.device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        date=time.strftime("%Y-%m-%d"),
        quick=q,
        ceiling_gflops=ceil,
        rows=ROWS,
    )
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "-" for c in dev.device_kind.lower())
    path = out / f"gpu_bench-{tag}{'-quick' if q else ''}.json"
    path.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
