"""Exact invariants of the gradient flow, as reference-free error monitors (docs/theory.md,
"Exact invariants").

* **Per-unit balance.** A hidden unit (a dense layer's output column, or a convolution's
  output channel, also through max-pooling) of a ReLU / leaky-ReLU / linear network can
  have its incoming weights scaled by ``a > 0`` and its outgoing weights by ``1/a``
  without changing the network. So ``<grad_in, w_in> = <grad_out, w_out>`` and
  ``Q_j = ||w_in_j||^2 - ||w_out_j||^2`` is constant along every gradient flow (every
  Clarke selection, so also on sliding solutions). The incoming weights include the
  unit's bias when the layer has one; the outgoing weights are the next layer's kernel
  entries that read the unit (a dense layer's row, a convolution's input-channel slice,
  the rows of a dense layer that read the channel after flattening). The next layer's
  bias is in no unit, which is why the identity holds with biases in every layer too.
* **Layer balance.** Summing ``Q_j`` over a layer's units gives
  ``||W_l||^2 - ||W_{l+1}||^2`` (a first-layer bias counted with ``W_1``; with biases in
  every layer, ``||(W_l, b_l)||^2 - ||W_{l+1}||^2``): constant too.
* **Dissipation.** ``d log Loss / d tau = -||grad log Loss||^2`` on the loss clock (on
  the time clock ``d log Loss / dt = -Loss ||grad log Loss||^2``). The flow carries
  ``D = integral of ||grad log Loss||^2 d tau`` as one extra ODE state (no extra gradient:
  the field has it), and ``log Loss(t) - log Loss(0) + D(t) = 0`` exactly.

A run records, at every save point and relative to its own initial parameters,

* ``balance_drift = sum_j |Q_j - Q_j(0)| / rho^2``,
* ``layer_balance_drift = sum_l |B_l - B_l(0)| / rho^2`` (``B_l = sum_{j in l} Q_j``),
* ``dissipation_defect = |Delta log Loss + D| / |Delta log Loss|``, and ``D`` itself
  (column ``dissipation``).

They are monitors only: no state is ever projected back onto them, which would hide the
very error they measure. GD breaks all three by ``O(eta^2)`` per step; its columns
measure how far the discrete dynamics is from the flow.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "MONITOR_COLUMNS",
    "Structure",
    "balance_structure",
    "unit_balances",
    "Monitor",
]

MONITOR_COLUMNS = ("balance_drift", "layer_balance_drift", "dissipation_defect")


class Structure(NamedTuple):
    """Which kernel entries are each hidden unit's incoming and outgoing weights.

    ``pairs``: one ``(l, m, kind, channels)`` per hidden layer: units are layer ``l``'s
    outputs, read by layer ``m``; ``kind`` is ``"dense"`` (rows of ``m``'s kernel),
    ``"conv"`` (input-channel slices of ``m``'s kernel) or ``"flatten"`` (rows
    ``c::channels`` of the dense kernel ``m`` that reads the flattened channels).
    """

    pairs: tuple


def balance_structure(graphdef, params) -> tuple[Structure | None, str]:
    """``(structure, "")`` for a gflow ``Sequential`` model with hidden units, else
    ``(None, reason)``: the balance columns are then left empty (NaN)."""
    from gflow.models import Conv, Sequential

    if callable(graphdef):
        return None, "the model is a function apply_fn(params, x): its hidden units are not known"
    model = nnx.merge(graphdef, params)
    if not isinstance(model, Sequential):
        return None, (
            f"the model ({type(model).__name__}) is not a gflow Sequential: its hidden "
            "units, and so its per-unit balance invariants, are not known"
        )
    layer_ops = [op[1] for op in model.ops if op[0] != "P"]
    if len(layer_ops) < 2:
        return None, "the model has no hidden units (one layer): there is no balance invariant"
    pairs = []
    for l, m in zip(layer_ops[:-1], layer_ops[1:], strict=True):
        src, dst = model.layers[l], model.layers[m]
        if isinstance(dst, Conv):
            kind = "conv"
        elif isinstance(src, Conv):
            kind = "flatten"
        else:
            kind = "dense"
        pairs.append((l, m, kind, int(src.kernel.shape[-1])))
    return Structure(tuple(pairs)), ""


def unit_balances(structure: Structure, params) -> list[jax.Array]:
    """``Q_j = ||w_in_j||^2 - ||w_out_j||^2`` for every hidden unit, one array per hidden
    layer (jittable)."""
    layers = params["layers"]
    out = []
    for l, m, kind, channels in structure.pairs:
        k_in = layers[l]["kernel"]
        sq_in = jnp.sum(jnp.square(k_in), axis=tuple(range(k_in.ndim - 1)))
        if layers[l].get("bias") is not None:
            sq_in = sq_in + jnp.square(layers[l]["bias"])
        k_out = jnp.square(layers[m]["kernel"])
        if kind == "dense":  # (units, out)
            sq_out = jnp.sum(k_out, axis=1)
        elif kind == "conv":  # (kh, kw, units, out)
            sq_out = jnp.sum(k_out, axis=(0, 1, 3))
        else:  # rows (i * w + j) * channels + c of the flattened (h, w, channels)
            sq_out = jnp.sum(k_out, axis=1).reshape(-1, channels).sum(axis=0)
        out.append(sq_in - sq_out)
    return out


class Monitor:
    """Turns a save point's state into the monitor columns, relative to the run's start.

    Built from the run's initial parameters and initial log loss; ``state()`` /
    ``from_state`` keep that reference across a resume (JSON, exact floats).
    """

    def __init__(self, balances0: list[np.ndarray] | None, log_loss0: float):
        self.balances0 = None if balances0 is None else [np.asarray(b) for b in balances0]
        self.log_loss0 = float(log_loss0)
        # the direction theta / |theta| at the last save point (flat, float64), for
        # `direction_step`; kept as an array beside `state()` in checkpoints
        self.last_unit: np.ndarray | None = None

    def direction_step(self, params) -> float:
        """``|u - u_prev|``, ``u = theta / |theta|`` at this save point and ``u_prev`` at the
        previous one (NaN at the first, or without parameters): the direction's chord
        between save points, what ``gflow.theory.direction`` fits."""
        if params is None:
            return math.nan
        import jax

        leaves = [np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(params)]
        flat = np.concatenate(leaves) if leaves else np.zeros(0)
        norm = float(np.linalg.norm(flat))
        u = flat / norm if norm > 0 else flat
        prev, self.last_unit = self.last_unit, u
        if prev is None or prev.shape != u.shape:
            return math.nan
        return float(np.linalg.norm(u - prev))

    def columns(self, balances, rho: float, log_loss: float, dissipation: float | None) -> dict:
        """The monitor columns at a save point (``MONITOR_COLUMNS`` and ``dissipation``):
        NaN where the invariant is not known."""
        nan = math.nan
        unit = layer = nan
        if self.balances0 is not None and balances is not None:
            r2 = float(rho) ** 2
            d = [
                np.asarray(b, np.float64) - b0
                for b, b0 in zip(balances, self.balances0, strict=True)
            ]
            unit = float(sum(np.abs(x).sum() for x in d)) / r2
            layer = float(sum(abs(x.sum()) for x in d)) / r2
        defect = nan
        if dissipation is None:
            dissipation = nan
        else:
            change = float(log_loss) - self.log_loss0
            gap = abs(change + float(dissipation))
            defect = 0.0 if gap == 0 else gap / abs(change) if change != 0 else math.inf
        return {
            "balance_drift": unit,
            "layer_balance_drift": layer,
            "dissipation_defect": defect,
            "dissipation": float(dissipation),
        }

    def state(self) -> dict:
        return dict(
            balances0=None if self.balances0 is None else [b.tolist() for b in self.balances0],
            log_loss0=self.log_loss0,
        )

    @classmethod
    def from_state(cls, state: dict) -> Monitor:
        b = state["balances0"]
        return cls(None if b is None else [np.asarray(x, np.float64) for x in b],
                   state["log_loss0"])  # fmt: skip


def layer_groups(apply_fn, params, x, tol: float) -> tuple[int, ...] | None:
    """The layers of a model gflow did not build, when its layer balances are invariants:
    the parameter arrays grouped by their parent in the pytree (a kernel and its bias),
    as one group index per leaf (``jax.tree.leaves`` order), if the model is
    1-homogeneous in each group on ``x`` (``Phi`` doubles when one group doubles, to
    ``tol`` relative). Then ``<grad_j Phi, theta_j> = Phi`` for each group ``j``, so every
    ``d/dt ||theta_j||^2`` along the flow is the same, and ``||theta_j||^2 -
    ||theta_k||^2`` is conserved. None otherwise (or with fewer than two groups)."""
    import numpy as np

    from gflow.models import leaf_layers

    groups = leaf_layers(params)
    if max(groups) < 1:
        return None
    leaves, treedef = jax.tree.flatten(params)
    base = np.asarray(apply_fn(params, x), np.float64)
    scale = np.linalg.norm(base)
    if scale == 0:
        return None
    for j in range(max(groups) + 1):
        scaled = [a * 2 if g == j else a for a, g in zip(leaves, groups, strict=True)]
        out = np.asarray(apply_fn(jax.tree.unflatten(treedef, scaled), x), np.float64)
        if not np.linalg.norm(out - 2 * base) <= tol * 2 * scale:
            return None
    return groups


def group_balances(params) -> list:
    """``||theta_j||^2 - ||theta_{j+1}||^2`` for consecutive layers (``layer_groups``'), each
    as a one-entry array (the ``unit_balances`` layout, one "unit" a layer)."""
    from gflow.models import layer_sq_norms

    sq = layer_sq_norms(params)
    return [jnp.reshape(sq[j] - sq[j + 1], (1,)) for j in range(sq.shape[0] - 1)]
