"""The command line's options: what a problem and a run are made of, each parsed and
checked once (``number``: the one factory of numeric argument types). The values reach
the library through ``gflow.runs.RunOptions``, which holds every default of ``gflow
run`` (``build_parser`` sets them on the parser, so ``--help`` prints the same)."""

from __future__ import annotations

import argparse
import math

__all__ = ["number", "add_problem_options", "add_run_options", "add_trust_option",
           "add_cache_option", "RUN_HELP"]


def number(kind: type = float, *, lo=None, hi=None, open_lo: bool = False,
           open_hi: bool = False, inf: bool = False, what: str | None = None):
    """An argparse type: a finite ``kind`` (int or float) in ``[lo, hi]`` (``open_lo`` /
    ``open_hi``: the bound itself excluded; None: unbounded), ``inf`` also taking
    ``inf`` / ``never``. Errors read "expected WHAT, got VALUE", WHAT a positive integer, a
    number in (0, 1], ... (``what`` names it instead)."""
    if what is None:
        noun = "integer" if kind is int else "number"
        if hi is None and lo is not None and ((lo == 0 and open_lo) or (kind is int and lo == 1)):
            what = f"a positive {noun}"
        elif lo is None and hi is None:
            what = f"a finite {noun}"
        elif hi is None:
            what = f"a finite {noun} >= {lo}"
        elif kind is int:
            what = f"an integer in {lo}..{hi}"
        else:
            what = f"a number in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
    elif hi is not None:
        what = f"{what} in {lo}..{hi}"

    def parse(text: str):
        if inf and text.strip().lower() in ("inf", "never"):
            return math.inf
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        bad = not math.isfinite(v) or (lo is not None and (v < lo or (open_lo and v == lo)))
        if bad or (hi is not None and (v > hi or (open_hi and v == hi))):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


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
        type=number(int, lo=1),
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
        type=number(int, lo=1, hi=65_536, what="a width"),
        default=defaults.get("width", 64),
        help="hidden width (mlp) or channels (cnn) (default: %(default)s)",
    )
    g.add_argument(
        "--depth",
        type=number(int, lo=1, hi=64, what="a depth"),
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
        "--order",
        dest="declared_order",
        type=number(int, lo=1),
        default=None,
        metavar="L",
        help="declare the homogeneity order L: an error unless the model is L-homogeneous, "
        "checked numerically on the data (default: the model's own)",
    )
    g.add_argument(
        "--loss",
        choices=sorted(LOSSES),
        default=defaults.get("loss", "logistic"),
        help="exp / logistic need two classes; ce any number (default: %(default)s)",
    )
    g.add_argument("--seed", type=number(int, lo=0, hi=2**32 - 1), default=0,
                   help="seed of the initialisation and subset (0..2^32-1)")  # fmt: skip
    g.add_argument("--dtype", choices=("float64", "float32"), default="float64")


RUN_HELP = """The default run: a bias-free 2-layer ReLU MLP (width 50, L = 2) on 300 real MNIST
digits 0 vs 1 from mnist5k, each image scaled to unit norm, logistic loss, float64;
GD with the paper's loss-based schedule and the gradient flow on the loss clock, both to
log t = 100 (t = e^100). The flow runs adaptive Tsit5 (rtol 3e-5) until the loss
threshold, then Ralston's two-stage method at a fraction (cfl) of its stability edge over
the top Hessian eigenvalue (stability stepping). Every save point records exact
invariants of the flow (per-unit and layer balance drift, dissipation defect) and an
estimate of its error from a shadow run at twice the steps, which sees the kinks'
errors; the cfl is chosen at every save point to hold that estimate to --accuracy
(starting at 0.14; a segment past it is redone at a smaller cfl), and the flow fidelity
verdict holds the drift to --rtol and the estimate to --accuracy (to log t = 30 the
normalized margin stays within 1e-4 of a tight reference at every save point;
benchmarks/RESULTS.md). About 31 s on a 2-core CPU the first time, 15 s after
(compiled and traced programs are kept: --compilation-cache). At
the end the theory checks run (gflow check). Files go to --out: gd/ and flow/ run folders
(config.json, trajectory.npz, trajectory.csv, params_final.npz, checks.json), run.json
and plots.png. While it runs, each run folder holds a checkpoint of its last save point:
a killed run goes on with --resume RUN_DIR. --seeds K trains K initialisations (GD and
the flow each as one vmapped run); the samples are split over all local devices
(--devices), and over several hosts with --coordinator / --num-processes / --process-id."""


def _solver_name(text: str) -> str:
    from gflow.dynamics.solvers import make_solver

    try:
        make_solver(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``gflow run``'s own options; their defaults are ``RunOptions``' (set on ``p``
    here, so that parsing and ``--help`` read the one source)."""
    from gflow.dynamics import CLOCKS, SCHEDULES, SOLVERS

    g = p.add_argument_group(
        "dynamics",
        "GD's options (--schedule, --lr, --alpha0, --loss-ub, --batch-size, "
        "--sharpness-every) and the flow's (--clock, --solver, --rtol, --atol, --dt, --cfl, "
        "--kinks, --kink-fallback, --input-span, --accuracy) are an error where the part "
        "they set does not run (--dynamics gd / flow), as is --lr under the loss-based "
        "schedule, --alpha0 "
        "under the constant one, --loss-ub without mini-batches and --sharpness-every with "
        "them",
    )
    g.add_argument(
        "--dynamics",
        choices=("gd", "flow", "both"),
        help="GD / SGD, gradient flow, or both (default: %(default)s)",
    )
    g.add_argument(
        "--seeds",
        type=number(int, lo=1, hi=1024, what="a number of seeds"),
        metavar="K",
        help="train K initialisations (seeds --seed .. --seed+K-1): GD as one vmapped run, "
        "the flow as another; per-seed run folders, mean / min / max in the table and "
        "bands in the plot (default: 1)",
    )
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="GD step: constant --lr, or the paper's loss-based alpha/Loss with "
        "roll-back (default: %(default)s)",
    )
    g.add_argument(
        "--lr",
        type=number(lo=0, open_lo=True),
        help="constant GD step size, on the sum loss Loss = sum_n l(q_n) (the theory's "
        "convention): a step lr on the sum is N x lr on the mean, so the paper's 0.01 on "
        "the mean loss is --lr 0.01/N here (default: %(default)s)",
    )
    g.add_argument(
        "--alpha0",
        type=number(lo=0, open_lo=True),
        help="initial alpha of the loss-based schedule (default: %(default)s)",
    )
    g.add_argument(
        "--loss-ub",
        type=number(lo=0, open_lo=True),
        metavar="RATIO",
        help="loss-based SGD: roll an epoch back as soon as a mini-batch's mean loss exceeds "
        "RATIO times the data's mean at the epoch's start, as the paper's official code "
        "does (600 on MNIST; default: no such bound, only a rise of the epoch's loss)",
    )
    g.add_argument(
        "--batch-size",
        type=number(int, lo=1),
        help="mini-batch SGD with this batch size (default: full-batch GD)",
    )
    g.add_argument(
        "--sharpness-every",
        type=number(int, lo=0, hi=10**9, what="a number of steps"),
        metavar="K",
        help="full-batch GD: estimate lambda_max(Hessian of Loss) at every K-th step and at "
        "every save point (3 Hessian-vector products each, warm-started), for the "
        "sharpness columns, their plot and the GD theorem's step condition eta lambda_max "
        "<= mu(Loss); 0: never (default: %(default)s)",
    )
    g.add_argument(
        "--clock",
        choices=CLOCKS,
        help="flow clock: loss (d tau = Loss dt), time, or logt (s = log(1+t)) "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--solver",
        type=_solver_name,
        help=f"flow solver: {', '.join(sorted(SOLVERS))}, or rkcS for any S in 2..200 "
        "(Runge-Kutta-Chebyshev, S stages); the implicit kvaerno5 and implicit-euler run "
        "under error control only (--rtol, not --dt or --cfl) and form the field's dense "
        "Jacobian: small models (default: ralston; rkc10 on a smooth model, linear "
        "activations, where the stability edge binds the step; bosh3 under --kinks)",
    )
    g.add_argument(
        "--rtol",
        type=number(lo=0, hi=1, open_lo=True, open_hi=True),
        help="flow relative tolerance: the adaptive solver's (also the warm-up's under "
        "stability stepping), and the accuracy the flow fidelity verdict holds the run's "
        "invariant drift to (default: 3e-5; 1e-9 under --kinks)",
    )
    g.add_argument(
        "--atol",
        type=number(lo=0, open_lo=True),
        help="flow absolute tolerance (default: 3e-8; 1e-12 under --kinks)",
    )
    g.add_argument(
        "--dt",
        type=number(lo=0, open_lo=True),
        help="fixed flow step in the clock's variable (default: adaptive)",
    )
    g.add_argument(
        "--cfl",
        type=number(lo=0, hi=1, open_lo=True),
        help="stability stepping at this cfl all along: after the loss threshold, step "
        "the solver at this fraction of its stability edge over the top Hessian eigenvalue "
        "(Lanczos); before it, adaptive Tsit5 at --rtol. Default, for a solver with a known "
        "edge: the cfl chosen at every save point from the error estimate to hold it to "
        "--accuracy, within 1/64 to 0.45, starting at 0.14 for ralston, midpoint and heun, "
        "0.2 for rk4, 0.45 for euler and rkcS (benchmarks/RESULTS.md); off for tsit5 and "
        "other solvers without a known edge",
    )
    g.add_argument(
        "--kinks",
        action="store_true",
        help="integrate the flow through the ReLU kinks event by event: each switch "
        "located, pairs whose both sides flow into their surface slid along it (the paper's "
        "flow), adaptive steps at --rtol in between (gflow's own MLPs, loss clock; --solver "
        "ralston becomes bosh3; not checkpointed yet). Counters of crossings and sliding "
        "pairs go into the trajectory. Where switches come so thick that events cost more "
        "than --kink-fallback times the default stepping, the run goes on by that stepping "
        "and says so",
    )
    g.add_argument(
        "--kink-fallback",
        type=number(lo=0, open_lo=True, inf=True),
        metavar="RATIO",
        help="under --kinks (an error without it): hand over to the default stepping where "
        "events cost more than RATIO times its gradient evaluations per unit of the loss "
        "clock (checked every 256 events; measured at most 34 on the default problem, "
        "480-650 on a wide one; default: %(default)s; inf: never)",
    )
    g.add_argument(
        "--input-span",
        choices=("auto", "on", "off"),
        help="integrate the flow's dense first layer in the span of the inputs: the same "
        "flow in fewer coordinates, exact to rounding at fixed steps (gflow's MLPs; auto: "
        "when there are at most half as many samples as inputs, as on the default "
        "problem's 300 images of 784 pixels; on: whenever the data's rank is below the "
        "input size, and an error before any folder is made where it cannot apply (data of "
        "full rank, a model that is not an MLP, samples over several devices); under "
        "--kinks only auto; default: %(default)s)",
    )
    g.add_argument(
        "--accuracy",
        type=number(lo=0, hi=1, open_lo=True, open_hi=True),
        help="the flow's error, relative to the normalized margin's scale, that the flow "
        "fidelity verdict holds the run's error estimate to (a shadow run at twice the "
        "steps, whose difference sees the kinks' errors; not under --kinks), and that the "
        "default stepping chooses its cfl for (default: %(default)s)",
    )
    g.add_argument(
        "--log-t-max",
        type=number(lo=0, open_lo=True),
        help="stop at this log t (default: %(default)s, i.e. t = e^100)",
    )
    g.add_argument(
        "--log-t-min",
        type=number(),
        help="first save point in log t (default: %(default)s)",
    )
    g.add_argument(
        "--log-loss-min",
        type=number(),
        help="also stop once log Loss falls to this value",
    )
    g.add_argument(
        "--steps",
        type=number(int, lo=1, hi=2**31 - 1, what="a step budget"),
        help="step budget: GD steps / flow solver steps (default: 100000 / 1000000)",
    )
    g.add_argument(
        "--saves",
        type=number(int, lo=1, hi=100_000, what="a number of save points"),
        help="save points, evenly spaced in log t (default: %(default)s)",
    )
    g.add_argument(
        "--save-params", action="store_true", help="keep a parameter snapshot at every save point"
    )
    d = p.add_argument_group("devices and hosts")
    d.add_argument(
        "--devices",
        type=number(int, lo=1),
        metavar="N",
        help="split the samples over N devices, data parallel (default: all devices, or "
        "the most that divide the sample count evenly)",
    )
    d.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="multi-host: address of process 0 for jax.distributed (default: "
        "$JAX_COORDINATOR_ADDRESS; none: one host)",
    )
    d.add_argument(
        "--coordinator-timeout",
        type=number(int, lo=1, hi=86_400, what="a number of seconds"),
        metavar="S",
        help="multi-host: give up, with a one-line error, when not every process has "
        "joined within S seconds (default: %(default)s)",
    )
    d.add_argument(
        "--num-processes",
        type=number(int, lo=1),
        help="multi-host: number of processes (default: $JAX_NUM_PROCESSES)",
    )
    d.add_argument(
        "--process-id",
        type=int,
        help="multi-host: this process's index, 0 writes the files (default: $JAX_PROCESS_ID)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--out", help="run folder to create (default: runs/run-YYYYmmdd-HHMMSS)"
    )
    o.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="write no checkpoints at save points (about 40 ms each; a killed run then "
        "cannot be resumed)",
    )
    o.add_argument(
        "--checkpoint-every",
        type=number(lo=0),
        metavar="SECONDS",
        help="write a checkpoint at the first save point this many seconds after the last "
        "one (a killed run loses at most that much; 0: at every save point; default "
        "%(default)s; a warning where none are written: --no-checkpoint, several hosts, "
        "a --dynamics flow --kinks run)",
    )
    o.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a killed or interrupted run from its last save point (its own "
        "options are used; finished parts are kept)",
    )
    o.add_argument(
        "--config",
        metavar="FILE.toml",
        help="TOML file whose keys are these options' names; flags override it",
    )
    o.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a status line every --status-every seconds instead "
                   "(log t, log Loss, steps, time left; for logs)")  # fmt: skip
    o.add_argument("--status-every", type=number(lo=0), metavar="SECONDS",
                   help="with --no-progress, seconds between status lines (0: none; "
                   "default %(default)s; a warning without --no-progress)")  # fmt: skip
    o.add_argument("--no-plot", action="store_true", help="skip plots.png")
    add_cache_option(o)
    from gflow.runs import RunOptions

    p.set_defaults(**{k: v for k, v in RunOptions.defaults().items() if k != "command"})


def add_trust_option(p) -> None:
    """``--trust-code``: load a run folder's model when it is kept as code."""
    p.add_argument("--trust-code", action="store_true",
                   help="load the folder's objective.pkl when its model is kept only as code "
                   "(a pickle: it runs whatever it holds, with your rights; only for folders "
                   "you made). Without it a run folder is read as data only, and what needs "
                   "such a model is n/a")  # fmt: skip


def add_cache_option(p) -> None:
    """``--compilation-cache`` (gflow.cache)."""
    p.add_argument("--compilation-cache", metavar="DIR|off", default=None,
                   help="folder of JAX's persistent compilation cache, or 'off' (default: "
                   "$GFLOW_COMPILATION_CACHE, else ~/.cache/gflow/jax); later runs of the "
                   "same shapes skip compiling, and (its 'traced' folder) tracing the flow's "
                   "programs for gflow's own models")  # fmt: skip
