"""The ``gflow`` command.

``gflow demo``: load data, build a homogeneous model, verify its homogeneity order and
print the margins and log loss at initialisation (the main job until the dynamics land).

Every bad option value ends with a one-line ``gflow: error: ...`` naming it and exit
code 2.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

__all__ = ["main", "build_parser"]


def _classes(text: str) -> tuple[int, ...] | str:
    if text == "all":
        return text
    try:
        out = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"classes must be integers like 0,1, got {text!r}"
        ) from None
    if len(out) < 2:
        raise argparse.ArgumentTypeError(f"need at least two classes, got {text!r}")
    return out


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_problem_options(p: argparse.ArgumentParser, **defaults) -> None:
    """Options that define a problem: data, model, loss, precision."""
    from gflow.data import SOURCES
    from gflow.losses import LOSSES
    from gflow.models import ACTIVATIONS, BIAS_MODES, MODELS

    g = p.add_argument_group("problem")
    g.add_argument(
        "--data",
        default=defaults.get("data", "mnist5k"),
        help=f"data source: {', '.join(SOURCES)} (default: %(default)s)",
    )
    g.add_argument(
        "--classes",
        type=_classes,
        default=defaults.get("classes", (0, 1)),
        help="classes to keep, comma separated; two give a binary problem "
        "(default: 0,1); 'all' keeps every class",
    )
    g.add_argument(
        "--n",
        type=_positive_int,
        default=defaults.get("n", 200),
        help="number of training samples, a seeded random subset (default: %(default)s)",
    )
    g.add_argument(
        "--scale",
        choices=("none", "unit"),
        default=defaults.get("scale", "none"),
        help="input scaling: none (pixels in [0,1]) or unit (each sample to norm 1)",
    )
    g.add_argument(
        "--model",
        choices=MODELS,
        default=defaults.get("model", "mlp"),
        help="model (default: %(default)s)",
    )
    g.add_argument(
        "--width",
        type=_positive_int,
        default=defaults.get("width", 64),
        help="hidden width (mlp) or channels (cnn) (default: %(default)s)",
    )
    g.add_argument(
        "--depth",
        type=_positive_int,
        default=defaults.get("depth", 2),
        help="parameterised layers (mlp) or conv blocks (cnn) (default: %(default)s)",
    )
    g.add_argument(
        "--bias",
        choices=BIAS_MODES,
        default=defaults.get("bias", "none"),
        help="none; first (first-layer bias, still homogeneous); all (control)",
    )
    g.add_argument(
        "--activation", choices=sorted(ACTIVATIONS), default=defaults.get("activation", "relu")
    )
    g.add_argument(
        "--loss",
        choices=sorted(LOSSES),
        default=defaults.get("loss", "logistic"),
        help="exp / logistic need two classes; ce any number (default: %(default)s)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation and subset")
    g.add_argument("--dtype", choices=("float64", "float32"), default="float64")


def build_problem(args):
    """``(dataset, model, objective, params0)`` from parsed problem options."""
    import jax.numpy as jnp

    from gflow import data as D
    from gflow.models import build_model
    from gflow.objective import make_objective

    ds = D.load(args.data, seed=args.seed, n=max(args.n, 2))
    if args.classes != "all":
        ds = D.keep_classes(ds, args.classes)
    ds = D.normalize(D.sample(ds, args.n, seed=args.seed), args.scale)
    binary_loss = args.loss in ("exp", "logistic")
    outputs = 1 if binary_loss else ds.num_classes
    model = build_model(
        args.model,
        ds.input_shape,
        outputs,
        width=args.width,
        depth=args.depth,
        bias=args.bias,
        activation=args.activation,
        seed=args.seed,
        dtype=jnp.float64 if args.dtype == "float64" else jnp.float32,
    )
    obj, params = make_objective(model, ds, args.loss)
    return ds, model, obj, params


def _format_table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def cmd_demo(args) -> int:
    import jax

    from gflow import objective as O
    from gflow.models import check_homogeneity

    t0 = time.perf_counter()
    ds, model, obj, params = build_problem(args)
    print(ds.describe())
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    order = model.order if model.order is not None else "none (bias in every layer)"
    print(f"model {args.model}: {model.depth} layers, {n_params:,} parameters, order L = {order}")
    rep = check_homogeneity(model, ds.x[: min(8, len(ds))])
    verdict = "holds" if rep.homogeneous else "BROKEN"
    print(
        f"homogeneity of order {rep.order}: {verdict} (worst relative error "
        f"{rep.max_rel_error:.2e}, estimated order {rep.estimated_order:.6f})"
    )
    q = O.quantities(obj, params)
    rows = [
        ("log Loss (sum)", f"{float(q.log_loss):.10g}"),
        ("log Loss (mean)", f"{float(q.log_loss_mean):.10g}"),
        ("q_min", f"{float(q.q_min):.6g}"),
        ("rho = ||theta||", f"{float(q.rho):.6g}"),
        ("normalized margin q_min/rho^L", f"{float(q.normalized_margin):.6g}"),
        ("layer-wise margin q_min/prod||W||", f"{float(q.layerwise_margin):.6g}"),
        ("smoothed margin", f"{float(q.smoothed_margin):.6g}"),
        ("train accuracy", f"{float(q.accuracy):.4f}"),
        ("support sizes (k = 1..7)", " ".join(str(int(c)) for c in q.support)),
        ("below loss threshold", str(float(q.log_loss) < obj.loss.log_threshold)),
    ]
    print("at initialisation:")
    print(_format_table(rows))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``gflow: error: ...``, exit code 2."""

    def error(self, message):
        self.exit(2, f"gflow: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from gflow import __version__

    parser = _Parser(
        prog="gflow",
        description="Gradient descent and gradient flow on homogeneous networks, checked "
        "against Lyu & Li (ICLR 2020).",
    )
    parser.add_argument("--version", action="version", version=f"gflow {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    demo = sub.add_parser(
        "demo",
        help="build a model on real data, verify its homogeneity, print margins at init",
        description="Load data (default: 200 real MNIST digits 0 vs 1 from mnist5k), build "
        "a homogeneous model (default: the paper's MNIST CNN), verify Phi(c theta) = "
        "c^L Phi(theta) numerically and print the log loss and margins at initialisation.",
    )
    add_problem_options(demo, model="paper-cnn")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    from gflow.data import DataError

    try:
        return args.func(args)
    except (DataError, ValueError) as e:
        print(f"gflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
