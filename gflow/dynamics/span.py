"""The flow of a dense first layer in the span of the inputs.

For a model whose first layer multiplies the flattened input by a kernel, ``x -> x K``
(gflow's MLPs), the gradient of any loss in ``K`` is ``X^T Delta`` (``X``: the n x d
inputs, ``Delta``: the errors at the layer's outputs), so its columns lie in the span of
the inputs. Along the flow ``K(t) = K_perp + V B(t)``: ``V`` (d x r) is an orthonormal
basis of that span, ``K_perp = (I - V V^T) K(0)`` never moves, and ``B(t)`` is the flow
of the same network on the projected inputs ``X V`` (n x r) from ``B(0) = V^T K(0)``.
The outputs agree (``X K_perp = 0``), and since ``V`` is orthonormal the gradients'
norms, the dissipation and the Hessian's nonzero spectrum do too. Every explicit
Runge-Kutta step commutes with this change of variables, so stepping ``B`` at fixed
steps is stepping ``K``, up to rounding; an adaptive controller measures its error in
``B``'s coordinates. With fewer samples than inputs (the default problem: 300 images of
784 pixels) the first layer's products cost ``r / d`` of theirs.

Quantities are always computed on the full parameters (``Span.lift_many``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gflow.objective import Objective

__all__ = ["Span", "input_span", "span_from_arrays"]

_FIRST = ("layers", 0, "kernel")  # where gflow's Sequential keeps its first kernel


class Span(NamedTuple):
    """The reduction of one flow run (or a batch of them).

    **Fields:** ``objective`` (the network on the projected inputs), ``basis`` (``V``,
    d x r), ``fixed`` (``K_perp`` of each run, a (K, d, width) array), ``sq_fixed``
    (each run's ``|K_perp|^2``: part of ``|theta|^2``, which the stable step's drift bound
    reads), ``size`` (the full parameters' number of entries)."""

    objective: Objective
    basis: jax.Array
    fixed: jax.Array
    sq_fixed: np.ndarray
    size: int  # the full parameters' number of entries

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def share(self, clock: str) -> float:
        """The fraction of the full ODE state's entries (without the dissipation monitor)
        that the reduced state carries: the error norm's correction (``flow._ThetaNorm``)."""
        (d, r), width = self.basis.shape, self.fixed.shape[2]
        extra = 1 if clock == "loss" else 0  # the loss clock's z = log(1 + t)
        return (self.size - (d - r) * width + extra) / (self.size + extra)

    def restrict(self, params):
        """``B = V^T K`` in a parameter pytree (one run)."""
        return _with_first(params, self.basis.T @ _first(params))

    def lift_many(self, params):
        """The full parameters of a batch (leading axis) of reduced ones."""
        return _lift(self.basis, self.fixed, params)

    def arrays(self) -> dict[str, np.ndarray]:
        """What a checkpoint keeps of the reduction (``span_from_arrays``)."""
        return {"span/basis": np.asarray(self.basis), "span/fixed": np.asarray(self.fixed)}


@jax.jit
def _lift(basis, fixed, params):
    k = fixed + jnp.einsum("dr,krw->kdw", basis, _first(params))
    return _with_first(params, k)


def _first(params):
    return params[_FIRST[0]][_FIRST[1]][_FIRST[2]]


def _with_first(params, kernel):
    layers = dict(params[_FIRST[0]])
    layers[_FIRST[1]] = {**layers[_FIRST[1]], _FIRST[2]: kernel}
    return {**params, _FIRST[0]: layers}


def _model(objective: Objective, params):
    """gflow's ``Sequential`` of ``objective`` when its first op is a dense layer on the
    flattened input, else None."""
    from flax import nnx

    from gflow.models import Sequential

    graphdef = objective.graphdef
    if callable(graphdef) or not isinstance(params, dict):
        return None
    try:
        model = nnx.merge(graphdef, params)
    except Exception:  # noqa: BLE001 - not a model gflow can take apart: no reduction
        return None
    if not isinstance(model, Sequential) or any(op[0] != "F" for op in model.ops):
        return None
    return model


def _projected(objective: Objective, model, basis) -> Objective:
    """``objective`` with inputs ``X V`` and the same network on r inputs."""
    from flax import nnx

    from gflow.models import Sequential, split_params

    widths = [layer.kernel.shape[1] for layer in model.layers][:-1]
    small = Sequential(
        (basis.shape[1],), [("F", w) for w in widths], model.num_outputs, bias=model.bias,
        activation=model.activation, rngs=nnx.Rngs(0), dtype=model.dtype,
    )  # fmt: skip
    x = objective.x.reshape(objective.x.shape[0], -1)
    x_r = jnp.asarray(np.asarray(x, np.float64) @ np.asarray(basis), objective.x.dtype)
    return dataclasses.replace(objective, x=x_r, graphdef=split_params(small)[0])


def input_span(objective: Objective, params0: list, when: bool | None = None) -> Span | None:
    """The reduction of flow runs from ``params0`` on ``objective``, or None.

    ``when``: None reduces when it at least halves the first layer's inputs (rank of the
    data ``r <= d / 2``; decided from the sample count ``n <= d / 2`` before any SVD, so
    that a large data set costs nothing), True whenever ``r < d``, False never. Only
    gflow's MLPs (every layer dense) on one device are reduced. The rank is NumPy's
    ``matrix_rank`` rule (singular values above ``max(n, d) eps s_max``): the directions
    left out carry the inputs' rounding only."""
    if when is False:
        return None
    model = _model(objective, params0[0])
    if model is None or len(objective.x.sharding.device_set) > 1:
        return None
    n, d = objective.x.shape[0], int(np.prod(objective.x.shape[1:]))
    if when is None and 2 * n > d:
        return None  # the rank is at most n: more than d / 2 samples would need the SVD
    x = np.asarray(objective.x, np.float64).reshape(n, d)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    tol = (s[0] if s.size else 0.0) * max(n, d) * np.finfo(np.float64).eps
    r = int(np.sum(s > tol))
    if r == 0 or r >= d or (when is None and 2 * r > d):
        return None
    basis = jnp.asarray(vt[:r].T, objective.x.dtype)
    ks = np.stack([np.asarray(_first(p), np.float64) for p in params0])
    v = np.asarray(basis, np.float64)
    fixed = ks - np.einsum("dr,kre->kde", v, np.einsum("dr,kde->kre", v, ks))
    return _make(objective, model, basis, fixed, params0)


def _make(objective, model, basis, fixed: np.ndarray, params0) -> Span:
    """The ``Span`` of ``basis`` and the runs' fixed parts ``fixed`` (K, d, width)."""
    sq = np.sum(fixed**2, axis=(1, 2))
    dtype = objective.x.dtype
    size = sum(int(np.size(a)) for a in jax.tree.leaves(params0[0]))
    return Span(_projected(objective, model, basis), basis, jnp.asarray(fixed, dtype), sq, size)


def span_from_arrays(objective: Objective, params0: list, arrays: dict) -> Span | None:
    """The reduction a checkpoint was written with (``Span.arrays``), or None when it was
    written without one."""
    if "span/basis" not in arrays:
        return None
    basis = jnp.asarray(arrays["span/basis"], objective.x.dtype)
    fixed = np.asarray(arrays["span/fixed"])
    return _make(objective, _model(objective, params0[0]), basis, fixed, params0)
