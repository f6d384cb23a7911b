"""The ``gflow`` command.

``gflow run``: the main job. Train one homogeneous network on one dataset by GD and/or
by integrating the gradient flow, record both on the clock ``log t``, write run folders,
a summary table and plots.

``gflow demo``: load data, build a homogeneous model, verify its homogeneity order and
print the margins and log loss at initialisation.

Every bad option value ends with a one-line ``gflow: error: ...`` naming it and exit
code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from gflow.options import (
    RUN_HELP,
    add_cache_option,
    add_problem_options,
    add_run_options,
    add_trust_option,
    number,
)

__all__ = ["main", "build_parser"]


def cmd_demo(args) -> int:
    import jax

    from gflow import objective as O
    from gflow.models import check_homogeneity
    from gflow.runs import format_table, problem_of

    t0 = time.perf_counter()
    ds, model, obj, params = problem_of(args).build()
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
    print(format_table(rows))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _apply_config_file(parser: argparse.ArgumentParser, args, argv: list[str]) -> None:
    """Fill options from --config FILE.toml unless given on the command line."""
    import tomllib
    from pathlib import Path

    path = Path(args.config)
    try:
        cfg = tomllib.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    sub = parser._run_parser  # type: ignore[attr-defined]
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    given = set()
    for tok in argv:
        if tok.startswith("--"):
            opt = sub._option_string_actions.get(tok.split("=", 1)[0])
            if opt is not None:
                given.add(opt.dest)
    for key, value in cfg.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            raise ValueError(f"unknown config key {key!r} in {path}")
        if dest in given:
            continue
        act = actions[dest]
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if isinstance(act, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
            setattr(args, dest, value)
            continue
        try:
            conv = act.type(str(value)) if act.type else value
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"config key {key!r}: {e}") from None
        if act.choices is not None and conv not in act.choices:
            raise ValueError(
                f"config key {key!r}: invalid choice {value!r} (choose from {sorted(act.choices)})"
            )
        setattr(args, dest, conv)


_RESUME_KEEPS = ("--resume", "--no-progress", "--no-plot", "--status-every",
                 "--compilation-cache", "--checkpoint-every")  # fmt: skip


def _refuse_changes_on_resume(given: list[str]) -> None:
    """``--resume`` goes on with the options in the run's ``run.json``: any other option
    on the command line (``given``: its flags) would be ignored, so it is refused, by
    name."""
    changed = sorted({flag for flag in given if flag not in _RESUME_KEEPS})
    if changed:
        raise ValueError(
            f"--resume goes on with the options the run was started with (its run.json); "
            f"{', '.join(changed)} cannot change them: start a new run instead"
        )


def cmd_run(args) -> int:
    """``gflow run``: the options, checked on the command line, to ``gflow.runs.run``."""
    from pathlib import Path

    from gflow.runs import RunOptions, run, saved_options

    if args.resume is not None:
        saved_options(Path(args.resume))  # a damaged run.json: one line naming it
        _refuse_changes_on_resume(getattr(args, "given", []))
    return run(RunOptions.from_namespace(args))


def _objective_of(folder, cfg: dict, trust_code: bool, needed: bool = False):
    """The objective of a saved run: rebuilt from its options (``gflow run``), else read
    as data from its ``objective.json`` (a library run), else (``trust_code`` only) from
    its ``objective.pkl``. None when there is none, or when it cannot be had (kept as
    code and not trusted, a spec that does not resolve): then one ``gflow: warning:``
    line says so (``needed``: the ``ValueError`` instead)."""
    from gflow.errors import one_line
    from gflow.objective import load_objective
    from gflow.problem import Problem

    problem = Problem.from_config(cfg)
    if problem is not None:
        return problem.build()[2]
    try:
        return load_objective(folder, trust_code=trust_code)
    except ValueError as e:  # kept as code, or a spec that does not resolve or build
        if needed:
            raise
        print(f"gflow: warning: {one_line(str(e))}; what needs the model is n/a",
              file=sys.stderr)  # fmt: skip
        return None


def _run_folders(path) -> list:
    from pathlib import Path

    path = Path(path)
    if (path / "config.json").is_file():
        return [path]
    subs = (
        sorted(p for p in path.iterdir() if (p / "config.json").is_file()) if path.is_dir() else []
    )
    if not subs:
        raise ValueError(f"{path} is not a run folder (no config.json in it or its subfolders)")
    return subs


def cmd_check(args) -> int:
    from gflow.runs import exit_code
    from gflow.theory import check_run, checks_json
    from gflow.trajectory import Trajectory, atomic_write

    runs, checks = [], []
    # every folder read (and validated) before any is written to: a damaged one among
    # several leaves all of them as they were
    loaded = [(folder, Trajectory.load(folder)) for folder in _run_folders(args.run_dir)]
    for folder, tr in loaded:
        obj = None if args.no_kkt else _objective_of(folder, tr.config, args.trust_code)
        verdicts = check_run(tr, obj, kkt=not args.no_kkt)
        print(f"{folder} ({tr.kind}, {tr.status}, log t up to {tr['log_t'][-1]:.4g}):")
        for v in verdicts:
            print(f"  {v}")
        atomic_write(folder / "checks.json", checks_json(verdicts).encode())
        print(f"  -> {folder / 'checks.json'}")
        runs.append(tr)
        checks.append(verdicts)
    return exit_code(runs, checks)


def cmd_compare(args) -> int:
    import json
    from pathlib import Path

    from gflow.compare import compare
    from gflow.plots import plot_comparison
    from gflow.runs import format_table
    from gflow.trajectory import Trajectory, atomic_write

    a, b = Trajectory.load(args.run_a), Trajectory.load(args.run_b)
    names = (Path(args.run_a).name or "a", Path(args.run_b).name or "b")
    cmp = compare(a, b, names)
    summ = cmp.summary()
    print(f"{names[0]} - {names[1]} at {summ['points']} save points of {names[0]}", end="")
    print(
        f", log t in [{summ['log_t_range'][0]:.4g}, {summ['log_t_range'][1]:.4g}]"
        if cmp.log_t.size
        else ""
    )
    for note in cmp.notes:
        print(f"  note: {note}")
    rows = []
    for k in ("log_loss", "rho", "normalized_margin", "smoothed_margin", "param_distance"):
        if k in summ:
            label = k + (" (relative)" if k in ("rho", "param_distance") else "")
            largest = summ[k].get("max_abs", summ[k].get("max"))
            rows.append((label, f"final {summ[k]['final']:+.4g}, largest {largest:.4g}"))
    print(format_table(rows))
    if args.out:
        # the plot is PNG whatever the name says; the summary goes beside it as .json (a
        # name ending in .json would otherwise be the summary and the plot at once)
        out = Path(args.out)
        if out.suffix.lower() != ".png":
            out = out.with_name(out.name + ".png")
        plot_comparison(cmp, out)
        atomic_write(out.with_suffix(".json"), (json.dumps(summ, indent=2) + "\n").encode())
        print(f"plot: {out}; summary: {out.with_suffix('.json')}")
    return 0


def cmd_attack(args) -> int:
    import json

    from gflow.robustness import Attack, attack_run
    from gflow.trajectory import Trajectory, atomic_write

    def report(label, min_eps, accuracy):
        finite = min_eps[np.isfinite(min_eps)]
        med = float(np.median(finite)) if finite.size else float("inf")
        print(f"  {label:<22} median minimal eps {med:.4g}, robust accuracy at eps_max/4 "
              f"{accuracy[5]:.3f}")  # fmt: skip

    attack = Attack(norm=args.norm, steps=args.steps, restarts=args.restarts)
    for folder in _run_folders(args.run_dir):
        tr = Trajectory.load(folder)
        obj = _objective_of(folder, tr.config, args.trust_code, needed=True)
        if obj is None:
            raise ValueError(f"{folder}: its problem cannot be rebuilt (neither gflow run's "
                             "options nor a saved objective)")  # fmt: skip
        print(f"{folder}: {args.norm} PGD ({args.steps} steps, {args.restarts} restart(s)) "
              f"on {min(args.n, obj.num_samples)} training images")  # fmt: skip
        try:
            out = attack_run(tr, obj, attack, n=args.n, eps_max=args.eps_max, report=report)
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from None
        atomic_write(folder / "robustness.json", (json.dumps(out) + "\n").encode())
        print(f"  -> {folder / 'robustness.json'}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``gflow: error: ...``, exit code 2. No abbreviated
    options: ``--ste 9`` would otherwise lose, silently, to a ``--config`` file's
    ``steps`` (the file is merged by full names)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

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
    run = sub.add_parser(
        "run",
        help="train by GD and/or gradient flow and record both on the log t clock",
        description="Train a homogeneous network by gradient descent and by integrating "
        "the gradient-flow ODE, on one clock (log t).\n\n" + RUN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from gflow.problem import RUN_DEFAULTS

    add_problem_options(run, **RUN_DEFAULTS)
    add_run_options(run)  # with RunOptions' defaults: the command line's are the library's
    run.set_defaults(func=cmd_run)
    parser._run_parser = run  # for --config
    check = sub.add_parser(
        "check",
        help="verdicts on the paper's claims for a run folder; writes checks.json",
        description="Check a run against Lyu & Li's claims: the smoothed margin never falls "
        "and rho grows past the loss threshold (Theorem 4.1); rho^L and 1/(Loss T) grow "
        "as (log T)^1 and (log T)^(2-2/L), decided by whether those exponents lie in the "
        "fitted intervals, where they are narrow enough to tell (Theorem 4.3); the "
        "direction converges and aligns with -grad Loss; the (eps, delta)-KKT residual at "
        "the saved parameters falls (Theorem 4.4). Each verdict is PASS, FAIL, "
        "INCONCLUSIVE (the run cannot decide it: the line says what would), OUTSIDE (its "
        "theorem does not cover the run, with the reason; GD: only a C^2 model on the "
        "exponential loss with eta lambda_max <= mu(Loss) at every step, judged on "
        "gamma_hat) or n/a. RUN_DIR is a run folder or a gflow run output with gd/ and "
        "flow/. Exit code 1 exactly when a claim FAILs inside its scope or a run failed, "
        "as gflow run's.",
    )
    check.add_argument("run_dir", metavar="RUN_DIR")
    check.add_argument("--no-kkt", action="store_true", help="skip the KKT residual")
    add_trust_option(check)
    add_cache_option(check)
    check.set_defaults(func=cmd_check)
    comp = sub.add_parser(
        "compare",
        help="compare two runs on log t (e.g. GD against the flow)",
        description="Align RUN_B on RUN_A's save points (monotone cubic interpolation in "
        "log t) and print the differences in log loss, rho, normalized and smoothed "
        "margin, and the parameter distance where both saved parameters.",
    )
    comp.add_argument("run_a", metavar="RUN_A")
    comp.add_argument("run_b", metavar="RUN_B")
    comp.add_argument("--out", default=None, metavar="PLOT.png",
                      help="plot the differences (PNG; '.png' is added to another name) and "
                      "write the summary beside it as PLOT.json")  # fmt: skip
    add_cache_option(comp)
    comp.set_defaults(func=cmd_compare)
    attack = sub.add_parser(
        "attack",
        help="adversarial robustness of a run's saved parameters (PGD, minimal eps)",
        description="For every parameter snapshot, loss-mark checkpoint and the final "
        "parameters of a run made by gflow run: the per-image minimal perturbation found by "
        "PGD with bisection, and robust accuracy against eps, on the training images. "
        "Writes robustness.json into the run folder.",
    )
    attack.add_argument("run_dir", metavar="RUN_DIR")
    attack.add_argument("--norm", choices=("l2", "linf"), default="l2")
    attack.add_argument("--eps-max", type=number(lo=0, open_lo=True), default=2.0)
    attack.add_argument("--n", type=number(int, lo=1), default=100, help="images attacked")
    attack.add_argument("--steps", type=number(int, lo=1), default=50)
    attack.add_argument("--restarts", type=number(int, lo=1), default=1)
    add_trust_option(attack)
    add_cache_option(attack)
    attack.set_defaults(func=cmd_attack)
    demo = sub.add_parser(
        "demo",
        help="build a model on real data, verify its homogeneity, print margins at init",
        description="Load data (default: 200 real MNIST digits 0 vs 1 from mnist5k), build "
        "a homogeneous model (default: the paper's MNIST CNN), verify Phi(c theta) = "
        "c^L Phi(theta) numerically and print the log loss and margins at initialisation.",
    )
    add_problem_options(demo, model="paper-cnn")
    add_cache_option(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def _start_distributed(args) -> None:
    """``jax.distributed.initialize`` from the flags or the JAX_* environment variables."""
    import os

    addr = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not addr:
        return
    env_n, env_i = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    n = args.num_processes or (int(env_n) if env_n else None)
    i = args.process_id if args.process_id is not None else (int(env_i) if env_i else None)
    if n is None or i is None:
        raise ValueError(
            f"multi-host run with coordinator {addr}: give --num-processes and --process-id "
            "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
        )
    if not 0 <= i < n:
        raise ValueError(f"--process-id must be in 0..{n - 1}, got {i}")
    from gflow.distributed import initialize, parse_address

    parse_address(addr)  # a malformed address: one line now, not a hang later
    print(f"gflow: joining the multi-host run at {addr} as process {i} of {n} (waiting up "
          f"to {args.coordinator_timeout} s for the others)", file=sys.stderr)  # fmt: skip
    initialize(addr, n, i, timeout=args.coordinator_timeout)


def entry() -> None:
    """The ``gflow`` command (and ``python -m gflow``): ``main()``, then a quick exit.
    Tearing the interpreter down frees JAX's compiled programs and buffers one by one
    (about 0.5 s at every exit); here the exit handlers run (JAX's, logging's, the
    checkpoint writer's) and the output is flushed, then the process ends. An exception
    ends it the usual way."""
    import atexit

    code = main()
    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_handlers is None:  # not CPython: the usual exit
        sys.exit(code)
    run_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    from gflow.data import DataError
    from gflow.errors import one_line
    from gflow.runs import held_folder, release

    try:
        args.given = [tok.split("=", 1)[0] for tok in argv[1:] if tok.startswith("--")]
        if getattr(args, "config", None):
            _apply_config_file(parser, args, argv)
        if getattr(args, "compilation_cache", None) is not None:
            from gflow.cache import configure

            configure(args.compilation_cache)
        if hasattr(args, "coordinator"):
            _start_distributed(args)
        return args.func(args)
    except (DataError, ValueError) as e:
        print(f"gflow: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable --out, a full disk: what and where, in one line
        where = f": {e.filename}" if e.filename else ""
        folder = held_folder()
        if folder is not None and (folder / "run.json").is_file():
            where += f"; go on with: gflow run --resume {folder}"
        print(f"gflow: error: {one_line(e.strerror or str(e))}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # (gflow.runs.run says it itself once run.json is written)
        folder, go_on = held_folder(), ""
        if folder is not None and (folder / "run.json").is_file():
            go_on = f"; go on with: gflow run --resume {folder}"
        print(f"gflow: interrupted{go_on}", file=sys.stderr)
        return 130
    finally:
        release()


if __name__ == "__main__":
    sys.exit(main())
