"""The main job as one library call: ``run(RunOptions(...))``.

``RunOptions`` is ``gflow run``'s options as a value (its defaults are the command
line's: ``gflow run --help`` shows them), ``run`` owns what the command does with them:
the problem (``gflow.problem.Problem``), the run folder (created exclusively, locked while
in use), GD and / or the flow with checkpoints, ``--resume`` from ``run.json``, the checks,
the summary table, ``summary.json`` and the plots. It writes its log to stdout (warnings
to stderr) and returns the command's exit code: 0, 1 when a run failed, 130 when
interrupted. ``gflow/cli.py`` only parses options into a ``RunOptions`` and calls it.

Run-folder ownership: ``claim`` takes a folder for this process (an atomic ``mkdir`` for
default names, then an ``flock`` on its lock file), ``release`` gives up every folder the
process holds (``gflow``'s ``main`` calls it on the way out, whatever happened).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

from gflow.problem import Problem

__all__ = [
    "RunOptions", "run", "claim", "release", "held_folder", "saved_options", "problem_of",
    "format_table", "exit_code", "saved_checks",
]  # fmt: skip


@dataclass
class RunOptions:
    """``gflow run``'s options (``gflow run --help`` describes each). Field order is the
    order of ``run.json``'s keys."""

    command: str = "run"
    # the problem (``Problem``'s defaults)
    data: str = Problem.data
    classes: tuple | str = Problem.classes
    n: int = Problem.n
    scale: str = Problem.scale
    model: str = Problem.model
    width: int = Problem.width
    depth: int = Problem.depth
    bias: str = Problem.bias
    activation: str = Problem.activation
    declared_order: int | None = Problem.order
    loss: str = Problem.loss
    seed: int = Problem.seed
    dtype: str = Problem.dtype
    # the dynamics
    dynamics: str = "both"
    seeds: int = 1
    schedule: str = "loss-based"
    lr: float = 0.01
    alpha0: float = 0.1
    loss_ub: float | None = None
    batch_size: int | None = None
    sharpness_every: int = 1  # full-batch GD's sharpness estimate: every K-th step; 0: off
    clock: str = "loss"
    solver: str | None = None  # None: solvers.default_solver (ralston; rkc10 if smooth)
    rtol: float | None = None  # 3e-5 / 3e-8; under kinks 1e-9 / 1e-12 (_validate)
    atol: float | None = None
    dt: float | None = None
    cfl: float | None = None
    kinks: bool = False
    kink_fallback: float = 100.0  # KinkStepping.fallback; inf: never
    input_span: str = "auto"  # the flow's first layer in the inputs' span: auto, on, off
    accuracy: float = 2e-4  # solvers.DEFAULT_ACCURACY: the error estimate's bound
    # how far and what is kept
    log_t_max: float = 100.0
    log_t_min: float = 0.0
    log_loss_min: float | None = None
    steps: int | None = None
    saves: int = 50
    save_params: bool = False
    # devices and hosts
    devices: int | None = None
    coordinator: str | None = None
    coordinator_timeout: int = 120
    num_processes: int | None = None
    process_id: int | None = None
    # output
    out: str | None = None
    no_checkpoint: bool = False
    checkpoint_every: float = 10.0
    resume: str | None = None
    config: str | None = None
    no_progress: bool = False
    status_every: float = 5.0
    compilation_cache: str | None = None
    no_plot: bool = False
    # the fields named on the command line (``from_namespace``), even at their default
    # values (None: not from a command line); not a field, so not in run.json
    given: ClassVar[frozenset[str] | None] = None

    def __post_init__(self):
        if isinstance(self.classes, list):
            self.classes = tuple(self.classes)

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_namespace(cls, ns) -> RunOptions:
        """The options of a parsed command line (``argparse.Namespace``)."""
        names = [f.name for f in dataclasses.fields(cls)]
        opts = cls(**{k: getattr(ns, k) for k in names if hasattr(ns, k)})
        flags = getattr(ns, "given", None)  # gflow.cli.main: the flags on the line
        if flags is not None:
            fields = {f.lstrip("-").replace("-", "_") for f in flags}
            fields = {"declared_order" if f == "order" else f for f in fields}  # --order
            opts.given = frozenset(fields & set(names))
        return opts

    @property
    def problem(self):
        """The ``Problem`` these options describe (samples over ``--devices``, or over all
        devices that divide them)."""
        return problem_of(self, devices=self.devices or "auto")

    def to_json(self) -> dict:
        """``run.json``: every option but ``resume`` (tuples as lists)."""
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()
            if k != "resume"
        }


def problem_of(opts, devices=None):
    """The ``Problem`` of parsed problem options (any object with their attributes)."""
    return Problem(
        data=opts.data, classes=opts.classes, n=opts.n, scale=opts.scale, model=opts.model,
        width=opts.width, depth=opts.depth, bias=opts.bias, activation=opts.activation,
        order=getattr(opts, "declared_order", None), loss=opts.loss, seed=opts.seed,
        dtype=opts.dtype, devices=devices,
    )  # fmt: skip


def saved_options(out: Path) -> dict:
    """The options a run folder was made with (its ``run.json``), checked to have the
    options' types; a ``ValueError`` naming the folder otherwise."""
    import json

    path = out / "run.json"
    if not out.is_dir():
        raise ValueError(f"--resume {out}: no such folder")
    if not path.is_file():
        raise ValueError(f"--resume {out}: not a gflow run folder (no run.json)")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume {out}: cannot read run.json: {e}") from None
    _check_saved_options(path, saved, RunOptions())
    return saved


def _resumed(args: RunOptions, out: Path) -> RunOptions:
    """``args`` with the options of the run folder ``out`` (for ``resume``); only
    ``no_progress``, ``no_plot``, ``status_every``, ``compilation_cache`` and
    ``checkpoint_every`` are kept from ``args``."""
    names = {f.name for f in dataclasses.fields(RunOptions)}
    kept = dict(resume=str(out), out=str(out), no_progress=args.no_progress,
                no_plot=args.no_plot, status_every=args.status_every,
                compilation_cache=args.compilation_cache,
                checkpoint_every=args.checkpoint_every)  # fmt: skip
    saved = {k: v for k, v in saved_options(out).items() if k in names and k not in kept}
    return dataclasses.replace(args, **saved, **kept)


def _check_saved_options(path, saved, args) -> None:
    """``run.json`` holds an object whose values have the options' types (a hand-edited
    or foreign file would otherwise fail deep inside the run)."""
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: {path} must hold a JSON object, got {type(saved).__name__}")
    for key, value in saved.items():
        default = getattr(args, key, None)
        if default is None or value is None or key == "classes":
            continue
        number = isinstance(default, int | float) and not isinstance(default, bool)
        ok = (
            isinstance(value, bool) == isinstance(default, bool)
            and (not number or isinstance(value, int | float))
            and (not isinstance(default, str) or isinstance(value, str))
        )
        if not ok:
            raise ValueError(
                f"--resume: {path}: {key!r} is {value!r}, expected a {type(default).__name__}"
            )


def _validate(args: RunOptions) -> None:
    from gflow.dynamics.solvers import (
        DEFAULT_TOL,
        IMPLICIT,
        default_cfl,
        is_fixed_step,
        stability_edge,
    )

    if args.input_span not in _SPAN:
        raise ValueError(f"--input-span must be one of {sorted(_SPAN)}, got {args.input_span!r}")
    if args.log_t_max <= args.log_t_min:
        raise ValueError(
            f"--log-t-max must exceed --log-t-min = {args.log_t_min}, got {args.log_t_max}"
        )
    kinks = args.dynamics != "gd" and args.kinks
    # --kinks: the tolerance at which it meets the flow's accuracy bar with the fewest
    # evaluations on the default problem (benchmarks/RESULTS.md, flow_kinks.py)
    if args.rtol is None:
        args.rtol = 1e-9 if kinks else DEFAULT_TOL[0]
    if args.atol is None:
        args.atol = 1e-12 if kinks else DEFAULT_TOL[1]
    if kinks:
        if args.dt is not None or args.cfl is not None or args.clock != "loss":
            raise ValueError("--kinks steps from event to event on the loss clock: leave "
                             "--dt, --cfl and --clock out")  # fmt: skip
        named = args.solver is not None  # else the library's: bosh3 through the kinks
        if named and (is_fixed_step(args.solver) or args.solver in IMPLICIT):
            raise ValueError(
                f"--kinks needs an explicit adaptive solver, got --solver {args.solver}"
            )
    elif args.dynamics != "gd":
        if args.dt is not None and args.cfl is not None:
            raise ValueError("give --dt or --cfl, not both")
        if args.solver in IMPLICIT and (args.dt is not None or args.cfl is not None):
            raise ValueError(f"--solver {args.solver} is implicit: it runs under error "
                             "control (--rtol / --atol), not with --dt or --cfl")  # fmt: skip
        # neither: the solver's default stepping (run_flow's), for one with a default cfl
        # the cfl the error estimate holds to --accuracy
        stepped = args.dt is not None or args.cfl is not None
        named = args.solver is not None  # else the library's default, with a default cfl
        if named and is_fixed_step(args.solver) and not stepped and \
                default_cfl(args.solver) is None:  # fmt: skip
            raise ValueError(f"--solver {args.solver} needs a fixed step --dt or a --cfl")
        if named and args.cfl is not None:
            stability_edge(args.solver)  # raises for solvers without a known edge
    if args.dynamics != "gd" and args.clock == "time" and args.log_t_max > 700:
        raise ValueError(
            f"--clock time cannot reach --log-t-max {args.log_t_max:g}; use loss or logt"
        )


_SPAN = {"auto": None, "on": True, "off": False}  # --input-span: run_flow's input_span

# options that only one part of ``--dynamics both`` reads (the rest apply to both)
_GD_ONLY = ("schedule", "lr", "alpha0", "loss_ub", "batch_size", "sharpness_every")
_FLOW_ONLY = ("clock", "solver", "rtol", "atol", "dt", "cfl", "kinks", "kink_fallback",
              "input_span", "accuracy")  # fmt: skip


class _Given(NamedTuple):
    """Which options were given: ``typed`` (on the command line, or away from its default
    in a library call) and ``filed`` (from a ``--config`` file only)."""

    typed: frozenset
    filed: frozenset

    @property
    def all(self) -> frozenset:
        return self.typed | self.filed


def _given(args: RunOptions) -> _Given:
    """The options given (``_Given``). A command line's are its flags (``RunOptions.given``,
    even at default values), and a value away from its default that no flag set came from
    the ``--config`` file; a library call's are its values away from the defaults. Read
    before ``_validate`` fills in defaults."""
    moved = {k for k, v in RunOptions.defaults().items() if getattr(args, k) != v}
    if args.given is None:
        return _Given(frozenset(moved), frozenset())
    return _Given(frozenset(args.given), frozenset(moved - args.given))


def _flags(names) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)


def _refuse_dropped(args: RunOptions, given: _Given) -> None:
    """A given option that the chosen run would not read, by the options that decide it
    (``--dynamics``, ``--kinks``, ``--schedule``, ``--batch-size``), is refused, naming it
    and why (issue 29: ``--kinks`` with ``--dynamics gd`` used to run GD and record
    ``kinks: true``). Where the option or what rules it out comes from a ``--config``
    file (a set of defaults, often shared by GD and flow runs) it is one warning line
    instead, and the option is put back to its default, so that ``run.json`` does not
    record it as used. New runs only: a resumed run goes on with its own options."""
    defaults = RunOptions.defaults()

    def refuse(names, why, causes):
        names = [n for n in names if n in given.all]
        if not names:
            return
        msg = f"{_flags(names)} {'applies' if len(names) == 1 else 'apply'} {why}"
        if not given.filed & {*names, *causes}:
            raise ValueError(msg)
        print(f"gflow: warning: {msg} (with --config {args.config}: left out, at its "
              "default in run.json)", file=sys.stderr)  # fmt: skip
        for n in names:
            setattr(args, n, defaults[n])

    if args.dynamics == "gd":
        refuse(_FLOW_ONLY, "to the flow; --dynamics gd runs no flow", ["dynamics"])
    if args.dynamics == "flow":
        refuse(_GD_ONLY, "to GD; --dynamics flow runs no GD", ["dynamics"])
    if args.dynamics != "gd":
        if not args.kinks:
            refuse(["kink_fallback"], "under --kinks only; give --kinks or leave it out",
                   ["kinks"])  # fmt: skip
        else:
            if args.input_span != "auto":
                refuse(["input_span"], "to the flow's default stepping; --kinks integrates "
                       "every parameter (its fallback decides by the data, as auto)",
                       ["kinks"])  # fmt: skip
            refuse(["accuracy"], "to the flow's error estimate, which --kinks runs do not "
                   "record yet", ["kinks"])  # fmt: skip
    if args.dynamics != "flow":
        if args.schedule == "loss-based":
            refuse(["lr"], "to --schedule constant; the loss-based schedule steps by "
                   "--alpha0 / Loss", ["schedule"])  # fmt: skip
        else:
            refuse(["alpha0", "loss_ub"], "to --schedule loss-based; the constant schedule "
                   "steps by --lr", ["schedule"])  # fmt: skip
        sgd = args.batch_size is not None and args.batch_size != args.n
        if args.schedule == "loss-based" and not sgd:
            refuse(["loss_ub"], "to mini-batches (--batch-size below --n); full-batch GD "
                   "rolls an epoch back on a rise of its loss only",
                   ["batch_size", "n"])  # fmt: skip
        if sgd:
            refuse(["sharpness_every"], f"to full-batch GD; --batch-size {args.batch_size} "
                   "runs SGD, which estimates no sharpness", ["batch_size", "n"])  # fmt: skip


def _warn_unused_output(args: RunOptions, given: _Given, hosts: int) -> None:
    """Output options that change nothing here: one warning line each (harmless: what is
    computed and kept is the same either way)."""
    why = None
    if "checkpoint_every" in given.all:
        if args.no_checkpoint:
            why = "--no-checkpoint writes no checkpoints"
        elif hosts > 1:
            why = "a multi-host run writes no checkpoints"
        elif args.dynamics == "flow" and args.kinks:
            why = "the --kinks flow is not checkpointed yet"
    if why is not None:
        print(f"gflow: warning: --checkpoint-every does nothing: {why}", file=sys.stderr)
    if "status_every" in given.all and not args.no_progress:
        print("gflow: warning: --status-every does nothing without --no-progress (it spaces "
              "the status lines that replace the progress bar)", file=sys.stderr)  # fmt: skip


def _refuse_unreduced_span(args: RunOptions, given: _Given, model, obj, params0) -> None:
    """``--input-span on`` where the flow cannot be taken into the inputs' span (a model
    that is not one of gflow's MLPs, samples over several devices, or inputs of full
    rank): refused before the run folder is made, rather than run in every coordinate
    under a run.json that says ``on``; from a ``--config`` file, a warning, and run.json
    records ``off``, what runs. The rank is decided by the flow's own rule
    (``gflow.dynamics.span.input_span``), so the two cannot disagree."""
    import numpy as np

    from gflow.dynamics.span import input_span
    from gflow.models import Sequential

    if args.dynamics == "gd" or args.kinks or args.input_span != "on":
        return
    devices = len(obj.x.sharding.device_set)
    if not isinstance(model, Sequential) or any(op[0] != "F" for op in model.ops):
        why = f"--model {args.model} is not one of gflow's MLPs (every layer dense)"
    elif devices > 1:
        why = f"the samples are split over {devices} devices (it is taken on one only)"
    elif input_span(obj, [params0], True) is None:
        n, d = obj.x.shape[0], int(np.prod(obj.x.shape[1:]))
        why = (f"the {n} inputs span all d = {d} input dimensions (rank not below d): there "
               "is nothing to leave out")  # fmt: skip
    else:
        return
    if "input_span" not in given.filed:
        raise ValueError(f"--input-span on cannot apply: {why}; use --input-span auto or off")
    print(f"gflow: warning: input-span = \"on\" (--config {args.config}) cannot apply: {why}; "
          "the flow runs in every coordinate (run.json: off)", file=sys.stderr)  # fmt: skip
    args.input_span = "off"


def driver_args(args: RunOptions, kind: str) -> dict:
    """The one translation of ``args`` (validated) into the arguments of ``run_gd`` /
    ``run_gd_seeds`` (``kind`` "gd") or ``run_flow`` / ``run_flow_seeds`` ("flow"), for
    single and ``--seeds`` runs alike; what differs between them (a run's seed, its
    progress, its checkpoint) the caller adds."""
    common = dict(log_t_max=args.log_t_max, log_loss_min=args.log_loss_min, saves=args.saves,
                  log_t_min=args.log_t_min, save_params=args.save_params)  # fmt: skip
    if kind == "gd":
        return dict(common, schedule=args.schedule, lr=args.lr, alpha0=args.alpha0,
                    loss_ub=args.loss_ub, batch_size=args.batch_size,
                    max_steps=args.steps or 100_000,
                    sharpness_every=args.sharpness_every)  # fmt: skip
    controller, dt0 = _stepping(args)
    return dict(common, clock=args.clock, solver=args.solver, stepsize_controller=controller,
                dt0=dt0, input_span=_SPAN[args.input_span], accuracy=args.accuracy,
                max_steps=args.steps or 1_000_000)  # fmt: skip


def _stepping(args: RunOptions) -> tuple:
    """The flow's ``(stepsize_controller, dt0)``: ``--kinks``' ``KinkStepping``, else what
    ``--dt`` / ``--cfl`` / ``--rtol`` / ``--atol`` stand for (``gflow.dynamics.stepping``,
    the library's own translation: the solver's default with none of them)."""
    from gflow.dynamics import KinkStepping, stepping

    if args.kinks:
        fallback = None if math.isinf(args.kink_fallback) else args.kink_fallback
        return KinkStepping(rtol=args.rtol, atol=args.atol, fallback=fallback), None
    if args.dt is not None:
        return stepping(args.solver, dt=args.dt)
    return stepping(args.solver, rtol=args.rtol, atol=args.atol, cfl=args.cfl)


def run(args: RunOptions) -> int:
    """Do what ``gflow run`` does with ``args`` (module docstring); the exit code."""
    import json
    import tempfile
    from datetime import datetime
    from pathlib import Path

    import jax

    from gflow import timing
    from gflow.distributed import is_writer
    from gflow.trajectory import atomic_write

    if args.compilation_cache is not None:
        from gflow.cache import configure

        configure(args.compilation_cache)
    resume = args.resume is not None
    hosts = jax.process_count()
    if hosts > 1 and resume:
        raise ValueError("--resume of a multi-host run is not supported; rerun it")
    if args.seeds > 1 and hosts > 1:
        raise ValueError(f"--seeds {args.seeds} runs on one host")
    given = _given(args)  # before _validate fills in defaults
    scratch = None
    if not is_writer():  # process 0 writes the run folder; the others compute only
        scratch = tempfile.TemporaryDirectory(prefix="gflow-worker-")
        args.out = str(Path(scratch.name) / "run")
    if resume:
        out = Path(args.resume)
        args = _resumed(args, out)
    else:
        out = (
            Path(args.out)
            if args.out
            else Path("runs") / datetime.now().strftime("run-%Y%m%d-%H%M%S")
        )
        # an --out named on the command line: refused now, before the problem is built
        # (a default name that another run took in the same second gets -2, -3, ... in
        # `claim` instead)
        if args.out and out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is a file")
        if args.out and out.is_dir() and _in_use(out / _LOCK):
            raise _busy(out)
        if args.out and out.is_dir() and any(out.iterdir()):
            raise ValueError(f"--out {out} exists and is not empty; choose a new folder")
    if not resume:
        _refuse_dropped(args, given)
    _validate(args)
    _warn_unused_output(args, given, hosts)
    with timing.phase("problem"):
        ds, model, obj, params0 = args.problem.build()
    if not resume:
        _refuse_unreduced_span(args, given, model, obj, params0)
    config = args.to_json()
    out, created = claim(out, unique=not (args.out or resume), resume=resume)
    if not resume:
        atomic_write(out / "run.json", (json.dumps(config, indent=2) + "\n").encode())
    try:
        return _run_in(args, out, created, ds, model, obj, params0, config)
    except KeyboardInterrupt:  # Ctrl-C outside the loops' own stops (they end in the same
        return _stop_interrupted(out)  # message): between GD and the flow, in the checks


def _run_in(args: RunOptions, out: Path, created: bool, ds, model, obj, params0,
            config: dict) -> int:  # fmt: skip
    """``run`` in its claimed folder ``out`` (holding ``run.json``): GD and / or the flow,
    the checks, the table, ``summary.json``, the plots; the exit code."""
    import json
    import shutil

    import jax

    from gflow import timing
    from gflow.checkpoint import Checkpointer
    from gflow.dynamics import run_flow, run_gd
    from gflow.plots import plot_trajectories
    from gflow.theory import check_run, checks_json
    from gflow.trajectory import atomic_write

    resume, hosts = args.resume is not None, jax.process_count()
    config.update(
        order=obj.order,
        homogeneous=obj.homogeneous,
        dataset=ds.name,
        num_samples=len(ds),
        num_devices=len(getattr(obj.x, "sharding", None).device_set),
        num_processes=hosts,
    )
    print(ds.describe())
    print(
        f"model {args.model}: {model.depth} layers, order L = {model.order}, "
        f"loss {args.loss}, {args.dtype}"
    )
    which = ["gd", "flow"] if args.dynamics == "both" else [args.dynamics]
    if args.seeds > 1:
        return _run_seeds(args, out, ds, obj, config, which)
    trajs, times, checks = {}, {}, {}
    for kind in which:
        folder = out / kind if len(which) > 1 else out
        # kink runs are not checkpointed yet (README): no checkpoint, and none promised
        kept = hosts == 1 and not args.no_checkpoint and not (args.kinks and kind == "flow")
        ck = Checkpointer(folder, every=args.checkpoint_every) if kept else None
        done = _completed_runs([folder]) if resume else None
        if done is not None:
            print(f"{kind}: already completed -> {folder}")
            trajs[kind], times[kind] = done[0], done[0].config.get("wall_seconds", float("nan"))
            checks[kind] = check_run(done[0], obj)
            _repair(folder, done[0], checks[kind])
            continue
        if resume and ck is not None and ck.exists():
            print(f"{kind}: resuming from the checkpoint in {ck.path}")
        bar = _Progress(kind, args.log_t_max, not args.no_progress, args.status_every)
        t0 = time.perf_counter()
        try:
            with timing.phase(kind):
                each = dict(config=config, progress=bar, checkpoint=ck, resume=resume)
                if kind == "gd":
                    tr = run_gd(obj, params0, seed=args.seed, **each, **driver_args(args, kind))
                else:
                    tr = run_flow(obj, params0, **each, **driver_args(args, kind))
        except ValueError:
            if created and not trajs and not (ck is not None and ck.exists()):
                shutil.rmtree(out, ignore_errors=True)  # bad input: leave no folder
            raise
        finally:
            bar.close()
        times[kind] = time.perf_counter() - t0
        trajs[kind] = tr
        tr.config["wall_seconds"] = times[kind]
        with timing.phase("write"):
            tr.save(folder, objective=False)
            _settle_checkpoint(ck, [tr], kind, out)
        print(f"{kind}: {tr.status}: {tr.message} ({times[kind]:.1f} s) -> {folder}")
        if _interrupted([tr]):
            return _stop_interrupted(out)
        with timing.phase(f"checks {kind}"):
            checks[kind] = check_run(tr, obj)
        atomic_write(folder / "checks.json", checks_json(checks[kind]).encode())
    _print_summary(trajs, times, checks, {k: _threshold_log_t(t, obj) for k, t in trajs.items()})
    if not args.no_plot:
        title = f"{ds.name}, {args.model} (L={obj.order}), {args.loss} loss"
        with timing.phase("plots"):
            path = plot_trajectories(trajs, out / "plots.png", title)
        print(f"plots: {path}")
    summary = {
        kind: {**tr.last(), "status": tr.status, "message": tr.message,
               "wall_seconds": times[kind], "threshold_log_t": _threshold_log_t(tr, obj)}
        for kind, tr in trajs.items()
    }  # fmt: skip
    atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write(out / "timing.json", (json.dumps(timing.report(), indent=2) + "\n").encode())
    _warn_never_below(trajs, obj)
    return exit_code(trajs.values(), checks.values())


_LOCK = ".gflow-lock"
_HELD: list = []  # run folders' lock files this process holds (released by main)
_FDS: dict = {}  # their open, flock-ed descriptors


def claim(out, *, unique: bool, resume: bool):
    """Create the run folder ``out`` and take it for this process: ``(folder, created)``.

    ``unique``: ``out`` is a default name, and ``out-2``, ``out-3``, ... are tried until one
    can be created (``mkdir`` is atomic), so that runs started in the same second get
    folders of their own. The folder is then held by an ``flock`` on its lock file: a
    second run naming it gets a one-line error while the holder lives, and the kernel
    drops the lock when the holder's process ends, however it ends (so ``--resume``
    works after a kill)."""
    import fcntl
    import os
    from pathlib import Path

    if unique:
        base, k = Path(out), 1
        while True:
            out = base if k == 1 else base.with_name(f"{base.name}-{k}")
            try:
                out.mkdir(parents=True)
                break
            except FileExistsError:
                k += 1
        created = True
    else:
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
    lock = out / _LOCK
    while True:
        # an flock on the lock file: the kernel releases it when the process ends, however
        # it ends, so no stale lock is ever taken over by guesswork about pids
        # O_NOFOLLOW: a lock planted as a symbolic link would have us truncate and write
        # whatever it points to (issue 29); it is refused instead
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            if lock.is_symlink():
                raise ValueError(f"{lock} is a symbolic link, not a lock file: refused (remove "
                                 "it to use this folder)") from None  # fmt: skip
            raise ValueError(f"cannot open the lock file {lock}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(out) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder removed it between our open and our flock: again
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _FDS[str(lock)] = fd
        break
    _HELD.append(lock)
    others = [p for p in out.iterdir() if p.name != _LOCK]
    if not resume and others:
        release()
        raise ValueError(f"--out {out} exists and is not empty; choose a new folder")
    return out, created


def _busy(out) -> ValueError:
    """The error for a run folder another run holds, naming its process when known."""
    holder = _lock_holder(out / _LOCK)
    who = f" (process {holder})" if holder is not None else ""
    return ValueError(f"{out} is in use by another gflow run{who}; choose another --out")


def _lock_holder(lock) -> int | None:
    """The process id written in ``lock`` (for messages), or None."""
    try:
        pid = int(lock.read_text().strip() or "0")
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _in_use(lock) -> bool:
    """Whether another run holds ``lock`` (its flock) now."""
    import fcntl
    import os

    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (closing drops the flock taken here)
    return False


def held_folder() -> Path | None:
    """The run folder this process holds last (None when it holds none)."""
    return _HELD[-1].parent if _HELD else None


def release() -> None:
    """Give up the run folders this process holds."""
    import os

    while _HELD:
        lock = _HELD.pop()
        lock.unlink(missing_ok=True)
        fd = _FDS.pop(str(lock), None)
        if fd is not None:
            os.close(fd)


def _threshold_log_t(tr, obj) -> float | None:
    """log t of the first save point below the loss threshold (the theory's t0), or None."""
    from gflow.theory import threshold_index

    i = threshold_index(tr, obj.loss.log_threshold)
    return None if i is None else float(tr["log_t"][i])


def _warn_never_below(trajs: dict, obj) -> None:
    """Say on stderr which runs never fell below the loss threshold: the paper's one
    assumption does not hold there (non-separable data, or too short a run)."""
    never = [k for k, tr in trajs.items() if _threshold_log_t(tr, obj) is None]
    if never:
        print(
            f"gflow: warning: {', '.join(never)} never fell below the loss threshold "
            f"(log Loss < {obj.loss.log_threshold:.4g}): the theory's assumption does not "
            "hold (the data may not be separable by this model, or the run is too short)",
            file=sys.stderr,
        )


def _repair(folder, tr, verdicts) -> None:
    """A completed run's derived files, written again where a kill left them out: the
    checks (written after the trajectory) and the CSV (from the npz)."""
    from gflow.theory import checks_json
    from gflow.trajectory import atomic_write

    if not (folder / "checks.json").is_file():
        atomic_write(folder / "checks.json", checks_json(verdicts).encode())
    if not (folder / "trajectory.csv").is_file():
        atomic_write(folder / "trajectory.csv", tr.to_csv().encode())


def _interrupted(runs) -> bool:
    """Whether Ctrl-C stopped these runs (their loops stop at the next safe point)."""
    return any(tr.status == "stopped" and tr.message.startswith("interrupted") for tr in runs)


def _stop_interrupted(out) -> int:
    """After Ctrl-C: what was reached is saved and checkpointed; nothing else starts."""
    print(f"gflow: interrupted; go on with: gflow run --resume {out}", file=sys.stderr)
    return 130


def _completed_runs(folders) -> list | None:
    """The runs saved in ``folders`` when every one of them completed (``--resume`` keeps
    them), else None."""
    from gflow.trajectory import Trajectory

    if not all((f / "config.json").is_file() for f in folders):
        return None
    runs = [Trajectory.load(f) for f in folders]
    return runs if all(tr.status == "completed" for tr in runs) else None


def _settle_checkpoint(ck, runs, kind, out) -> None:
    """Clear the checkpoint once every run completed; else say how to go on."""
    if ck is None:
        return
    if all(tr.status == "completed" for tr in runs):
        ck.clear()
    else:
        print(f"{kind}: the last good state is checkpointed; gflow run --resume {out}")


def _run_seeds(args, out, ds, obj, config, which) -> int:
    """``gflow run --seeds K``: GD for all seeds in one vmapped run, the flow in another."""
    import json

    import numpy as np

    from gflow.checkpoint import Checkpointer
    from gflow.dynamics import run_flow_seeds, run_gd_seeds
    from gflow.models import split_params
    from gflow.plots import plot_seed_bands
    from gflow.theory import check_run, checks_json
    from gflow.trajectory import atomic_write

    resume = args.resume is not None
    seeds = [args.seed + i for i in range(args.seeds)]
    inits = [split_params(args.problem.make_model(ds, s))[1] for s in seeds]
    groups, table, verdicts = {}, [], []
    for kind in which:
        kept = not args.no_checkpoint and not (args.kinks and kind == "flow")
        ck = Checkpointer(out / kind, every=args.checkpoint_every) if kept else None
        folders = [out / kind / f"seed-{s}" for s in seeds]
        runs = _completed_runs(folders) if resume else None
        if runs is not None:
            print(f"{kind}: already completed -> {out / kind}")
            wall = sum(tr.config.get("wall_seconds", float("nan")) for tr in runs)
            for folder, tr in zip(folders, runs, strict=True):
                if not (folder / "checks.json").is_file():
                    _repair(folder, tr, check_run(tr, obj))
                verdicts.append(saved_checks(folder))
        else:
            if resume and ck is not None and ck.exists():
                print(f"{kind}: resuming from the checkpoint in {ck.path}")
            t0 = time.perf_counter()
            bar = _Progress(f"{kind} x{len(seeds)}", args.log_t_max, not args.no_progress,
                            args.status_every)  # fmt: skip
            each = dict(seeds=seeds, config=config, progress=_Slowest(len(seeds), bar),
                        checkpoint=ck, resume=resume)  # fmt: skip
            try:
                many = run_gd_seeds if kind == "gd" else run_flow_seeds
                runs = many(obj, inits, **each, **driver_args(args, kind))
            finally:
                bar.close()
            wall = time.perf_counter() - t0
            for folder, tr in zip(folders, runs, strict=True):
                tr.config["wall_seconds"] = wall / len(runs)
                tr.save(folder, objective=False)
                verdicts.append(check_run(tr, obj))
                atomic_write(folder / "checks.json", checks_json(verdicts[-1]).encode())
            _settle_checkpoint(ck, runs, kind, out)
            if _interrupted(runs):
                return _stop_interrupted(out)
        groups[kind] = runs
        final = {c: np.array([tr[c][-1] for tr in runs]) for c in ("normalized_margin",
                 "smoothed_margin", "log_loss")}  # fmt: skip
        ok = sum(tr.status == "completed" for tr in runs)
        print(f"{kind}: {len(runs)} seeds in {wall:.1f} s, {ok} completed -> {out / kind}")
        for c, v in final.items():
            stats = f"mean {v.mean():.6g}  min {v.min():.6g}  max {v.max():.6g}"
            table.append((f"{kind} {c}", stats))
    print(format_table(table))
    if not args.no_plot:
        title = f"{ds.name}, {args.model} (L={obj.order}), {args.loss} loss"
        print(f"plots: {plot_seed_bands(groups, out / 'plots.png', title)}")
    summary = {
        kind: [
            {**tr.last(), "seed": s, "status": tr.status,
             "threshold_log_t": _threshold_log_t(tr, obj)}
            for s, tr in zip(seeds, runs, strict=True)
        ]
        for kind, runs in groups.items()
    }  # fmt: skip
    atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    _warn_never_below({f"{k} seed {s}": tr for k, runs in groups.items()
                       for s, tr in zip(seeds, runs, strict=True)}, obj)  # fmt: skip
    return exit_code([tr for r in groups.values() for tr in r], verdicts)


def exit_code(runs, verdicts) -> int:
    """The exit code of ``gflow run`` and ``gflow check`` on the same runs: 1 when a run
    failed (it broke down or diverged) or an in-scope verdict FAILs
    (``gflow.verdict.failed``), else 0. ``verdicts``: one list per run."""
    from gflow.verdict import failed

    bad = any(tr.status == "failed" for tr in runs) or any(failed(vs) for vs in verdicts)
    return 1 if bad else 0


def saved_checks(folder) -> list:
    """The verdicts in a run folder's ``checks.json`` (none when it has none)."""
    import json

    from gflow.verdict import Verdict

    path = Path(folder) / "checks.json"
    if not path.is_file():
        return []
    return [Verdict.from_dict(d) for d in json.loads(path.read_text())["verdicts"]]


def format_table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


class _Progress:
    """Progress of one run over log t: a tqdm bar that appears after two seconds, or
    with ``enabled`` false (``--no-progress``, for logs) a status line every ``every``
    seconds (``_Status``; none when ``every`` is 0)."""

    def __init__(self, label: str, log_t_max: float, enabled: bool, every: float = 5.0):
        self.bar = self.status = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=round(log_t_max, 3),
                desc=label,
                unit="log t",
                delay=2.0,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| log t {n:.4g}/{total:.4g} "
                "[{elapsed}<{remaining}{postfix}]",
            )
        elif every > 0:
            self.status = _Status(label, log_t_max, every)

    def __call__(self, row: dict) -> None:
        if self.status is not None:
            self.status.update(row)
        if self.bar is None:
            return
        lt = row.get("log_t", float("-inf"))
        if lt == lt and lt > self.bar.n:
            self.bar.n = round(min(lt, self.bar.total), 3)
        post = {"log_loss": f"{row['log_loss']:.4g}"}
        if "smoothed_margin" in row:
            post["margin~"] = f"{row['smoothed_margin']:.4g}"
        self.bar.set_postfix(post, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.status is not None:
            self.status.close()


class _Status:
    """A background thread that prints ``label: log t a/b, log Loss c, step n, m:ss
    elapsed, about m:ss left`` to stdout every ``every`` seconds, from the last save
    point reported (``update``); the time left extrapolates log t's pace over the last
    minute of save points ("?" before two)."""

    def __init__(self, label: str, log_t_max: float, every: float):
        import threading

        self.label, self.log_t_max, self.every = label, log_t_max, every
        self.t0 = time.perf_counter()
        self.row: dict = {}
        self.seen: list = []  # (wall, log t) of save points with a finite log t
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="gflow-status")
        self.thread.start()

    def update(self, row: dict) -> None:
        self.row = row
        lt = row.get("log_t", float("nan"))
        if math.isfinite(lt):
            self.seen.append((time.perf_counter(), lt))

    def line(self) -> str:
        now = time.perf_counter()
        r, parts = self.row, []
        lt = r.get("log_t", float("nan"))
        parts.append(f"log t {lt:.4g}/{self.log_t_max:.4g}" if r else "starting")
        if "log_loss" in r:
            parts.append(f"log Loss {r['log_loss']:.4g}")
        if "step" in r:
            parts.append(f"step {int(r['step'])}")
        parts.append(f"{_clock(now - self.t0)} elapsed")
        recent = [(w, v) for w, v in self.seen if w >= now - 60] or self.seen[-2:]
        left = "?"
        if len(recent) >= 2 and recent[-1][1] > recent[0][1]:
            pace = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
            left = _clock(max(self.log_t_max - recent[-1][1], 0.0) / pace)
        parts.append(f"about {left} left")
        return f"{self.label}: " + ", ".join(parts)

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            print(self.line(), flush=True)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class _Slowest:
    """Progress of K runs at once: the bar shows the run that is furthest behind."""

    def __init__(self, k: int, bar: _Progress):
        self.k, self.bar, self.log_t = k, bar, {}

    def __call__(self, row: dict) -> None:
        self.log_t[row["seed"]] = row["log_t"]
        if len(self.log_t) == self.k:
            self.bar({**row, "log_t": min(self.log_t.values())})


def _print_summary(
    trajs: dict, times: dict, checks: dict | None = None, below: dict | None = None
) -> None:
    """The run table; ``below``: each run's log t of first falling below the loss
    threshold (None: never)."""
    keys = [
        ("status", None),
        ("steps", "step"),
        ("grad evals", "grad_evals"),
        ("log t", "log_t"),
        ("log Loss", "log_loss"),
        ("rho", "rho"),
        ("q_min", "q_min"),
        ("normalized margin", "normalized_margin"),
        ("smoothed margin", "smoothed_margin"),
        ("train accuracy", "accuracy"),
        ("balance drift", "balance_drift"),
        ("below threshold", None),
        ("wall s", None),
    ]
    names = list(trajs)
    print()
    print(f"{'':<18}" + "".join(f"{n:>16}" for n in names))
    for label, col in keys:
        cells = []
        for n in names:
            tr = trajs[n]
            if label == "status":
                cells.append(tr.status)
            elif label == "wall s":
                cells.append(f"{times[n]:.1f}")
            elif label == "below threshold":
                at = (below or {}).get(n, "?")
                cells.append("NEVER" if at is None else "?" if at == "?" else f"log t {at:.4g}")
            elif col in tr.columns and len(tr):
                v = float(tr[col][-1])
                cells.append(f"{int(v)}" if col in ("step", "grad_evals") else f"{v:.6g}")
            else:
                cells.append("-")
        print(f"{label:<18}" + "".join(f"{c:>16}" for c in cells))
    if checks:
        labels = []
        for vs in checks.values():
            labels += [v.name for v in vs if v.name not in labels]
        for label in labels:
            cells = []
            for n in names:
                v = next((v for v in checks.get(n, []) if v.name == label), None)
                cells.append("-" if v is None else v.mark)
            print(f"{label:<18}" + "".join(f"{c:>16}" for c in cells))
        for n in names:
            for v in checks.get(n, []):
                if v.decide:  # INCONCLUSIVE: why, and what would decide it
                    print(f"{v.name} ({n}) inconclusive: {v.summary.rsplit('; ', 1)[-1]}; "
                          f"to decide it: {v.decide}")
        print("(details: checks.json in each run folder; gflow check RUN_DIR)")
