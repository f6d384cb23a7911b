"""Model structure + loss + data -> pure, jitted functions of the parameter pytree.

``Objective`` is an equinox module: the data are array leaves (passed to compiled code
as arguments, never baked in as constants) and the model graph and loss are static, so
``jax.jit``, ``jax.vmap`` and ``jax.grad`` see it as an ordinary pytree. Its methods are
the un-jitted building blocks used inside larger jitted code (scans, ODE fields); the
module-level functions ``log_loss``, ``grad_log_loss``, ``margins``, ``quantities`` are
their jitted forms taking ``(objective, params)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array

from gflow import quantities as Q
from gflow.data import DataError, Dataset
from gflow.invariants import balance_structure, group_balances, layer_groups, unit_balances
from gflow.losses import LOSSES, Loss, get_loss, multiclass_margins
from gflow.models import Sequential, apply, layer_norms, split_params

__all__ = [
    "Objective",
    "make_objective",
    "as_dataset",
    "load_objective",
    "shard",
    "log_loss",
    "grad_log_loss",
    "value_and_grad",
    "margins",
    "quantities",
]


class Objective(eqx.Module):
    """The training objective of one model on one dataset.

    **Fields:** ``x`` (inputs), ``y`` (signed labels as floats for binary losses,
    class indices for cross-entropy), ``graphdef`` (the model structure), ``loss``,
    ``order`` (L used for normalised margins: the declared order, or the depth for a
    non-homogeneous control), ``homogeneous`` (whether ``order`` is a true order).
    """

    x: Array
    y: Array
    graphdef: Any = eqx.field(static=True)
    loss: Loss = eqx.field(static=True)
    order: int = eqx.field(static=True)
    homogeneous: bool = eqx.field(static=True)
    # whether the gradient field is smooth (linear activations); False for ReLU / leaky
    # ReLU, whose field jumps at kinks; None when not known
    smooth: bool | None = eqx.field(static=True, default=None)
    # a model gflow did not build that is 1-homogeneous in each layer: the group of each
    # parameter leaf (gflow.invariants.layer_groups), for its layer balances; else None
    layer_groups: tuple | None = eqx.field(static=True, default=None)
    # the family of a gflow model that a follow-up theorem is about (``family``): "linear"
    # (fully connected, linear activations, one output: its KKT points are global optima,
    # Vardi, Shamir & Srebro 2022), "leaky2" (two layers, leaky ReLU, one output: Lyu et
    # al. 2021), else None
    family: str | None = eqx.field(static=True, default=None)
    # the model as data (``gflow.specs``: {"factory": "module:Name", "kwargs": {...}}) as
    # JSON text, so that a run folder rebuilds it without code; None when it has none
    spec: str | None = eqx.field(static=True, default=None)

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def dtype(self):
        return self.x.dtype

    def describe(self) -> dict:
        """What a run's config records about the objective (for later checks)."""
        return dict(
            loss=self.loss.name,
            log_threshold=self.loss.log_threshold,
            order=self.order,
            homogeneous=self.homogeneous,
            num_samples=self.num_samples,
            dtype=np.dtype(self.dtype).name,
            smooth=self.smooth,
        )

    @property
    def as_data(self) -> bool:
        """Whether ``save`` keeps this objective as data alone (a model spec and one of
        gflow's losses), with no ``objective.pkl``."""
        return self.spec is not None and type(self.loss) is LOSSES.get(self.loss.name)

    def save(self, folder) -> None:
        """Write the objective into ``folder``: ``objective.json`` (the model's spec, the
        loss's name, the order and the flags), ``objective.npz`` (the data) and, only
        when the model or the loss cannot be kept as data (``as_data``), ``objective.pkl``
        (the model structure and the loss by cloudpickle, so that a model class defined in
        a script is kept by value). ``load_objective`` reads them back; the pickle only
        when trusted."""
        from gflow.distributed import to_host
        from gflow.trajectory import atomic_write, npz_bytes

        folder = Path(folder)
        flags = dict(
            order=self.order, homogeneous=self.homogeneous, smooth=self.smooth,
            layer_groups=None if self.layer_groups is None else list(self.layer_groups),
            family=self.family,
        )  # fmt: skip
        model = json.loads(self.spec) if self.as_data else None
        meta = dict(format=1, loss=self.loss.name, model=model, **flags)
        atomic_write(folder / "objective.json", (json.dumps(meta, indent=2) + "\n").encode())
        data = {"x": to_host(self.x), "y": to_host(self.y)}
        atomic_write(folder / "objective.npz", npz_bytes(data))
        if self.as_data:
            (folder / "objective.pkl").unlink(missing_ok=True)  # an older save's
        else:
            import cloudpickle

            static = dict(graphdef=self.graphdef, loss=self.loss, **flags)
            static["layer_groups"] = self.layer_groups
            atomic_write(folder / "objective.pkl", cloudpickle.dumps(static))

    def outputs(self, params) -> Array:
        return apply(self.graphdef, params, self.x)

    def margins_of(self, out: Array) -> Array:
        """Margins ``q_n`` from outputs: ``y_n Phi`` (binary) or ``Phi_y - max_j Phi_j``."""
        if self.loss.binary:
            return self.y.astype(out.dtype) * out
        return multiclass_margins(out, self.y)

    def _labels(self, out: Array) -> Array:
        return self.y.astype(out.dtype) if self.loss.binary else self.y

    def margins(self, params) -> Array:
        return self.margins_of(self.outputs(params))

    def log_loss(self, params) -> Array:
        """``log Loss(theta)``, the log of the sum loss, in the model's precision (it
        drives the dynamics; ``quantities`` records it in float64)."""
        out = self.outputs(params)
        return self.loss.log_loss(out, self._labels(out))

    def grad_log_loss(self, params):
        """``grad log Loss = grad Loss / Loss``: finite even when Loss underflows."""
        return jax.grad(self.log_loss)(params)

    def value_and_grad(self, params):
        return jax.value_and_grad(self.log_loss)(params)

    def quantities(self, params) -> Q.Quantities:
        """Everything recorded at a save point. Computed in float64 when x64 is on (the
        default), also for a float32 model: its outputs are cast up before the loss and
        the margins (O(N C) work), so the recorded log-sum-exp over the samples, margins
        and norms keep float64's digits."""
        out = _wide(self.outputs(params))
        q = self.margins_of(out)
        ll = self.loss.log_loss(out, self._labels(out))
        got = Q.compute(self.loss, q, ll, params, self.order, layer_norms(params))
        return got._replace(balances=self.balances(params),
                            alignment_gap=self.alignment_gap(params))  # fmt: skip

    def alignment_gap(self, params) -> Array:
        """``1 - cos(theta, -grad Loss)`` (Ji & Telgarsky 2020's alignment: it tends to 0
        along the flow of a homogeneous net), computed as ``|u - v|^2 / 2`` for the unit
        vectors ``u = theta / |theta|``, ``v = -g / |g|``: the same number without the
        cancellation of ``1 - cos`` (its digits survive below 1e-16). One gradient."""
        from jax.flatten_util import ravel_pytree

        theta = ravel_pytree(jax.tree.map(_wide, params))[0]
        g = ravel_pytree(jax.tree.map(_wide, self.grad_log_loss(params)))[0]
        u = theta / jnp.linalg.norm(theta)
        v = -g / jnp.linalg.norm(g)
        return 0.5 * jnp.sum(jnp.square(u - v))

    def balances(self, params):
        """Per-unit balances ``||w_in||^2 - ||w_out||^2`` (``gflow.invariants``), in ``q``'s
        precision, one array per hidden layer; None when the model's units are unknown."""
        structure, _ = balance_structure(self.graphdef, params)
        if structure is not None:
            return unit_balances(structure, jax.tree.map(_wide, params))
        if self.layer_groups is not None:
            return group_balances(jax.tree.map(_wide, params))
        return None

    def invariant_reasons(self, params) -> dict:
        """Why a monitor column stays empty for this model: ``{column: reason}``."""
        structure, why = balance_structure(self.graphdef, params)
        if structure is not None:
            return {}
        if self.layer_groups is not None:
            return {"balance_drift": why + "; its layer balances are monitored (it is "
                    "1-homogeneous in each layer)"}  # fmt: skip
        return {"balance_drift": why, "layer_balance_drift": why}


def load_objective(folder, *, trust_code: bool = False) -> Objective | None:
    """The ``Objective`` saved in a run folder by ``Objective.save`` (``Trajectory.save``
    of a library run), or None when there is none.

    Read as data (``objective.json``, ``objective.npz``; the model rebuilt from its spec
    by installed code, ``gflow.specs``). A folder whose model is kept only as code
    (``objective.pkl``) raises ``UntrustedCode``, a ``ValueError``, unless
    ``trust_code=True``: then the pickle is loaded, after a one-line warning naming it.
    Unpickling runs whatever code the file holds, so trust only folders you made."""
    from gflow.errors import UntrustedCode, summarize, warn

    folder = Path(folder)
    meta_path, pkl, npz = (folder / f"objective.{ext}" for ext in ("json", "pkl", "npz"))
    if not npz.is_file() or not (meta_path.is_file() or pkl.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if meta is not None and not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        with np.load(npz, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: say which
        raise ValueError(f"cannot read the objective saved in {folder} ({summarize(e)})") from None
    if meta is not None and meta.get("model") is not None:
        return _objective_from_data(folder, meta, x, y)
    if not pkl.is_file():
        return None
    if not trust_code:
        raise UntrustedCode(f"{pkl} holds the model as code (a pickle), which gflow does "
                            "not load without --trust-code (trust_code=True in the library)")
    warn(f"loading code from {pkl} (--trust-code): it runs with your rights")
    import pickle

    try:
        static = pickle.loads(pkl.read_bytes())
        if not isinstance(static, dict):
            raise TypeError(f"it holds a {type(static).__name__}, not an objective's fields")
        return Objective(x=jnp.asarray(x), y=jnp.asarray(y), **static)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read the objective saved in {folder} ({summarize(e)})") from None


def _objective_from_data(folder: Path, meta: dict, x, y) -> Objective:
    """An objective from ``objective.json``'s fields: each checked, the model rebuilt
    from its spec (``gflow.specs.build``)."""
    from gflow import specs

    where = folder / "objective.json"

    def field(name, kind, optional=False):
        value = meta.get(name)
        if (value is None and optional) or (isinstance(value, kind) and not
                                            (kind is int and isinstance(value, bool))):
            return value
        raise ValueError(f"{where}: field {name!r} is {value!r}, expected {kind.__name__}")

    loss = get_loss(field("loss", str))
    groups = field("layer_groups", list, optional=True)
    if groups is not None and not all(isinstance(g, int) for g in groups):
        raise ValueError(f"{where}: field 'layer_groups' must hold integers")
    try:
        spec = specs.as_spec(meta["model"])
        model = specs.build(spec, folder)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    graphdef, _ = split_params(model)
    return Objective(
        x=jnp.asarray(x), y=jnp.asarray(y), graphdef=graphdef, loss=loss,
        order=field("order", int), homogeneous=field("homogeneous", bool),
        smooth=field("smooth", bool, optional=True),
        layer_groups=None if groups is None else tuple(groups),
        family=field("family", str, optional=True), spec=json.dumps(spec, sort_keys=True),
    )  # fmt: skip


def _wide(out: Array) -> Array:
    """Outputs in float64 (when x64 is on), for the loss and the margins."""
    return out.astype(jnp.float64) if jax.config.jax_enable_x64 else out


def make_objective(
    model,
    dataset,
    loss: Loss | str,
    *,
    order: int | None = None,
    params=None,
    devices=None,
    spec=None,
) -> tuple[Objective, dict]:
    """Pair a model with data and a loss; returns ``(objective, initial params)``.

    ``model``: any ``flax.nnx.Module`` mapping a batch (n, ...) to (n,), (n, 1) or
    (n, classes), or a pure function ``apply_fn(params, x)`` given with ``params``.
    ``dataset``: a ``Dataset``, or arrays ``(x, y)`` with labels in ``0..C-1`` or, for
    two classes, in ``{-1, +1}``. The data are cast to the parameters' dtype. Binary
    losses (exp, logistic) need two classes and one output; cross-entropy one output
    per class.
    ``order``: the homogeneity order L, checked numerically on the data
    (``Phi(c theta) = c^L Phi(theta)``; a wrong one raises ``ValueError``). gflow's own
    models declare it; any other model must be given it.
    ``devices``: shard the data over these devices (or this many; see ``shard``).
    ``spec``: for a model of one's own, ``("package.module:ModelClass", kwargs)`` naming
    an installed ``nnx.Module`` class that rebuilds it as ``ModelClass(**kwargs,
    rngs=...)`` (checked here), so that a saved run keeps the model as data
    (``gflow.specs``); gflow's own models give theirs themselves. Without one, a saved
    run keeps the model as code, which ``gflow check`` loads only with ``--trust-code``.
    """
    from gflow import specs
    from gflow.models import check_finite_params, check_homogeneity, params_dtype

    loss = get_loss(loss) if isinstance(loss, str) else loss
    if not isinstance(loss, Loss):
        raise TypeError(f"loss must be a gflow Loss or its name, got {type(loss).__name__}")
    arrays = not isinstance(dataset, Dataset)
    dataset = _labelled(dataset, loss)
    if isinstance(model, nnx.Module):
        graphdef, params = split_params(model)
    elif callable(model) and params is not None:
        graphdef = model
    else:
        raise TypeError(
            "model must be an nnx.Module, or a function apply_fn(params, x) given with "
            f"params=; got {type(model).__name__}"
        )
    ours = isinstance(model, Sequential)
    check_finite_params(params, "params")
    dtype = params_dtype(params)
    if ours and int(np.prod(dataset.input_shape)) != int(np.prod(model.in_shape)):
        raise ValueError(
            f"model expects inputs of shape {model.in_shape}, data have {dataset.input_shape}"
        )
    x = jnp.asarray(dataset.x, dtype)
    num_outputs = _num_outputs(graphdef, params, x)
    if order is not None:
        _check_declared_order(model, graphdef, params, x, order)
    elif not ours:
        est = check_homogeneity(graphdef, x[:16], order=1, params=params).estimated_order
        raise ValueError(
            f"give make_objective the homogeneity order L of {type(model).__name__} "
            f"(order=L; it is checked numerically): its outputs scale as c^{est:.3g} when "
            "its parameters scale by c"
        )
    if loss.binary:
        if not dataset.binary:
            raise ValueError(
                f"loss {loss.name!r} is binary but {dataset.name} has {dataset.num_classes} "
                "classes; keep two classes or use loss 'ce'"
            )
        if num_outputs != 1:
            raise ValueError(f"loss {loss.name!r} needs a model with 1 output, got {num_outputs}")
        y = jnp.asarray(dataset.y_signed, dtype)
    else:
        if arrays:
            dataset = _per_output(dataset, num_outputs, loss)
        if num_outputs != dataset.num_classes:
            raise ValueError(
                f"loss 'ce' needs {dataset.num_classes} outputs (one per class), "
                f"the model has {num_outputs}"
            )
        y = jnp.asarray(dataset.y, jnp.int32)
    declared = model.order if ours else order
    groups = None
    if not ours:
        tol = 1e-9 if dtype == jnp.float64 else 1e-4  # check_homogeneity's
        groups = layer_groups(lambda p, v: apply(graphdef, p, v), params, x[:16], tol)
    obj = Objective(
        x=x,
        y=y,
        graphdef=graphdef,
        loss=loss,
        order=int(declared or model.depth),
        homogeneous=declared is not None,
        smooth=_smooth(model),
        layer_groups=groups,
        family=family(model, num_outputs) if ours else None,
        spec=specs.spec_text(model, spec) if isinstance(model, nnx.Module) else None,
    )
    return (obj if devices is None else shard(obj, devices)), params


def _g(v) -> str:
    return f"{float(v):g}"


def _labelled(data, loss: Loss) -> Dataset:
    """``as_dataset`` with array labels checked by value first (``_class_indices``); a
    ``Dataset`` as it is (its labels are class indices already)."""
    if isinstance(data, Dataset):
        return data
    try:
        x, y = data
    except (TypeError, ValueError):
        return as_dataset(data)  # its TypeError, naming what was given
    return as_dataset((x, _class_indices(y, loss)))


def _class_indices(y, loss: Loss) -> np.ndarray:
    """Array labels as class indices, by value, in any real dtype (a ``ValueError``
    naming the first offending label): two classes as ``{0, 1}`` or ``{-1, +1}`` (-1 is
    class 0, as ``as_dataset`` reads them; a binary loss takes only these), else whole
    numbers ``0..C-1`` (cross-entropy; ``_per_output`` checks them against the model's
    C outputs). Booleans read as 0 and 1."""
    y = np.asarray(y)
    if y.dtype == np.bool_:
        return y.astype(np.int64)
    if y.dtype.kind not in "iuf":
        raise ValueError(f"labels must be real numbers, got dtype {y.dtype}")
    if y.size == 0:
        return y.astype(np.int64)  # Dataset says "empty"
    flat = y.reshape(-1)
    kind = "two classes, {0, 1} or {-1, +1}" if loss.binary else "class indices 0..C-1"
    bad = ~np.isfinite(flat) | (flat != np.round(flat)) | (np.abs(flat) >= 2**31)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"label {_g(flat[i])} (sample {i}) is not a class: loss {loss.name!r} takes {kind}"
        )
    values = np.unique(flat)
    signed = bool((values == -1).any()) and set(values.tolist()) <= {-1, 1}
    allowed = {-1, 1} if (values == -1).any() else {0, 1}
    off = [v for v in values.tolist() if v not in allowed]
    if loss.binary and off:
        shown = [int(v) for v in values[:5]]
        raise ValueError(
            f"label {_g(off[0])} is not a class of binary loss {loss.name!r}: it takes {kind}; "
            f"labels present: {shown}{' ...' if len(values) > 5 else ''}"
        )
    if not signed and values[0] < 0:
        raise ValueError(f"label {_g(values[0])} is not a class: loss {loss.name!r} takes {kind}")
    return (y > 0).astype(np.int64) if signed else y.astype(np.int64)


def _per_output(dataset: Dataset, num_outputs: int, loss: Loss) -> Dataset:
    """Array labels for cross-entropy, as classes of the model's ``num_outputs``: each
    in ``0..C-1`` (a class may be absent from the data)."""
    top = int(dataset.y.max())
    if top >= num_outputs:
        raise ValueError(
            f"label {top} is out of range for loss {loss.name!r}: class indices 0.."
            f"{num_outputs - 1}, one per output of the model"
        )
    if dataset.num_classes == num_outputs or num_outputs < 2:
        return dataset
    return Dataset(dataset.x, dataset.y, num_outputs, dataset.name)


def as_dataset(data) -> Dataset:
    """A ``Dataset`` as it is, or one made from arrays ``(x, y)``: labels in ``0..C-1``,
    or ``{-1, +1}`` for two classes (read as 0 and 1)."""
    if isinstance(data, Dataset):
        return data
    try:
        x, y = data
    except (TypeError, ValueError):
        raise TypeError(
            f"data must be a gflow Dataset or a pair (x, y) of arrays, got {type(data).__name__}"
        ) from None
    y = np.asarray(y)
    if y.size and set(np.unique(y).tolist()) <= {-1, 1} and (y == -1).any():
        y = (y > 0).astype(np.int64)
    if y.size and np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integers (class indices) or +-1, got dtype {y.dtype}")
    classes = int(y.max()) + 1 if y.size else 0
    return Dataset(np.asarray(x), y, max(classes, 2), "arrays")


def _num_outputs(graphdef, params, x) -> int:
    """Outputs per sample of the model, checked to be (n,), (n, 1) or (n, C); a model
    that does not take the data's samples is one ``ValueError`` naming their shape."""
    probe = x[: min(2, x.shape[0])]
    try:  # traced, not compiled
        out = jax.eval_shape(lambda p, v: apply(graphdef, p, v), params, probe)
    except (TypeError, ValueError, IndexError) as err:  # a shape error from deep in JAX
        lines = str(err).strip().splitlines()
        why = lines[0] if lines else type(err).__name__
        raise ValueError(
            f"the model does not take the data's inputs of shape {tuple(x.shape[1:])} "
            f"(a batch {tuple(probe.shape)}): {why}"
        ) from err
    if out.ndim not in (1, 2) or out.shape[0] != probe.shape[0]:
        raise ValueError(
            f"the model maps a batch of {probe.shape[0]} to shape {out.shape}; expected "
            "(n,), (n, 1) or (n, classes)"
        )
    return 1 if out.ndim == 1 else int(out.shape[1])


def family(model: Sequential, num_outputs: int) -> str | None:
    """``Objective.family`` of one of gflow's models: "linear" for a fully-connected
    linear network (a one-layer model included), "leaky2" for a two-layer leaky-ReLU
    MLP, both bias-free with one output; else None."""
    if num_outputs != 1 or model.bias != "none" or any(op[0] != "F" for op in model.ops):
        return None
    if model.activation == "linear" or model.depth == 1:
        return "linear"
    return "leaky2" if model.activation == "leaky_relu" and model.depth == 2 else None


def _smooth(model) -> bool | None:
    """``Objective.smooth`` of a model: known for gflow's own activations (and a model of
    one layer has none: it is linear in its input and polynomial in its weights)."""
    act = getattr(model, "activation", None)
    if act is None:
        return None
    if any(op[0] == "P" for op in getattr(model, "ops", ())):
        return False  # max-pool: kinks where two inputs of a window tie
    return act == "linear" or len(getattr(model, "layers", ())) == 1


def shard(objective: Objective, devices=None) -> Objective:
    """The same objective with its samples split over ``devices`` (data parallel).

    ``devices``: a list of devices, a count (the first that many of ``jax.devices()``),
    or None for all of them, across every process of a ``jax.distributed`` run. The
    inputs and labels are laid out along a one-axis mesh ``("data",)``; the parameters
    stay replicated. Every jitted computation on the objective (log-loss and its
    gradient, margins, quantities, the GD and flow loops, Hessian products) is then
    partitioned by XLA, with all-reductions where the sums over samples meet. On one
    device this returns ``objective`` unchanged. The number of samples must be a
    multiple of the number of devices.
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    every = jax.devices()
    if devices is None:
        devices = every
    elif isinstance(devices, int | np.integer):
        if not 1 <= devices <= len(every):
            raise ValueError(f"devices must be in 1..{len(every)} here, got {devices}")
        devices = every[: int(devices)]
    devices = list(devices)
    if len(devices) == 1:
        return objective
    n, k = objective.num_samples, len(devices)
    if n % k:
        raise ValueError(
            f"{n} samples do not split evenly over {k} devices; use a sample count that "
            f"is a multiple of {k} (e.g. {n - n % k}) or fewer devices"
        )
    mesh = Mesh(np.asarray(devices), ("data",))

    def place(a):
        a_host = np.asarray(a)
        spec = PartitionSpec("data", *([None] * (a_host.ndim - 1)))
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(a_host.shape, sharding, lambda idx: a_host[idx])

    return eqx.tree_at(lambda o: (o.x, o.y), objective, (place(objective.x), place(objective.y)))


def _check_declared_order(model, graphdef, params, x, order: int) -> None:
    from gflow.models import check_homogeneity

    if isinstance(order, bool) or not isinstance(order, int | np.integer) or order < 1:
        raise ValueError(f"declared homogeneity order must be an integer >= 1, got {order!r}")
    rep = check_homogeneity(graphdef, x[:16], order=int(order), params=params)
    if not rep.homogeneous:
        if isinstance(model, Sequential):
            actual = (
                f"L = {model.order}" if model.order else "not homogeneous (bias in every layer)"
            )
        else:
            actual = f"scaling as c^{rep.estimated_order:.3g}"
        raise ValueError(
            f"declared homogeneity order {order} is wrong: Phi(c theta) differs from "
            f"c^{order} Phi(theta) by {rep.max_rel_error:.2g} (relative); the model is {actual}"
        )


# Jitted forms: one compilation per (objective structure, shapes, dtypes).
log_loss = jax.jit(lambda obj, params: obj.log_loss(params))
grad_log_loss = jax.jit(lambda obj, params: obj.grad_log_loss(params))
value_and_grad = jax.jit(lambda obj, params: obj.value_and_grad(params))
margins = jax.jit(lambda obj, params: obj.margins(params))
quantities = jax.jit(lambda obj, params: obj.quantities(params))
