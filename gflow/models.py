"""Homogeneous networks in Flax NNX (docs/theory.md, "Objects").

Every model here is a plain sequence of parameterised layers (dense or convolution),
each followed by the activation except the last, with 2x2 max-pooling and flatten in
between. Without biases such a network is positively homogeneous of order
``L = number of parameterised layers``; a first-layer bias counted as a weight keeps that
order (the paper's experiments); biases everywhere break it (a non-homogeneous control,
``order is None``).

Convolutions are written as shifted slices + one matrix product (im2col) and
max-pooling as reshape + max: XLA's own convolution runs 25-40x slower inside
``lax.scan`` / diffrax loops on CPU (docs/theory.md, "Known traps"). ``impl="xla"`` keeps the
``lax.conv_general_dilated`` formulation as a reference; the tests check both agree with
``nnx.Conv``.

Parameters are split off once with ``split_params``: a plain nested dict whose layer
``i`` lives under ``params["layers"][i]``. ``apply(graphdef, params, x)`` is the pure
forward function every numeric routine uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array

__all__ = [
    "ACTIVATIONS",
    "BIAS_MODES",
    "MODELS",
    "Dense",
    "Conv",
    "Sequential",
    "MLP",
    "CNN",
    "paper_cnn",
    "vgg16",
    "build_model",
    "split_params",
    "params_dtype",
    "apply",
    "leaf_layers",
    "layer_sq_norms",
    "layer_norms",
    "HomogeneityReport",
    "check_homogeneity",
    "check_finite_params",
    "max_pool",
]

BiasMode = Literal["none", "first", "all"]
BIAS_MODES = ("none", "first", "all")
LEAKY_SLOPE = 0.1
# Biases start small but non-zero: with zero biases a bias-everywhere network is still
# homogeneous at initialisation, and the non-homogeneous control would not be one.
BIAS_INIT_STD = 0.1


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> nnx.Param:
    """N(0, std^2) parameters drawn on the host from the stream's next key.

    Drawn with numpy, not ``jax.random``: eager jax.random compiles once per shape
    (~0.5 s each on CPU, 9 s for VGG-16) and initialisation would dominate short runs.
    """
    seed = np.asarray(jax.random.key_data(rngs.params())).ravel().tolist()
    draw = np.random.default_rng(seed).standard_normal(shape) * std
    return nnx.Param(jnp.asarray(draw, dtype))


def _he(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> nnx.Param:
    """He-normal (Kaiming) weights: N(0, 2 / fan_in), fan_in = all axes but the last."""
    return _normal(rngs, shape, math.sqrt(2.0 / math.prod(shape[:-1])), dtype)


def _bias(rngs: nnx.Rngs, n: int, dtype) -> nnx.Param:
    return _normal(rngs, (n,), BIAS_INIT_STD, dtype)


def _linear(x):
    return x


def _leaky(x):
    return jnp.where(x >= 0, x, LEAKY_SLOPE * x)


ACTIVATIONS = {"relu": jax.nn.relu, "leaky_relu": _leaky, "linear": _linear}


class Dense(nnx.Module):
    """``x @ W (+ b)``, He-normal weights, N(0, 0.1^2) bias."""

    def __init__(self, fan_in: int, fan_out: int, *, bias: bool, rngs: nnx.Rngs, dtype):
        self.kernel = _he(rngs, (fan_in, fan_out), dtype)
        self.bias = _bias(rngs, fan_out, dtype) if bias else None

    def __call__(self, x):
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


def _im2col_same(x: Array, kh: int, kw: int) -> Array:
    """Patches of a stride-1 SAME convolution, channels last: (n, h, w, kh*kw*c)."""
    n, h, w, c = x.shape
    # TensorFlow's SAME: total padding k-1, the smaller half before.
    pad = ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0))
    xp = jnp.pad(x, pad)
    cols = [xp[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1)


class Conv(nnx.Module):
    """Stride-1 SAME 2-D convolution, kernel (kh, kw, c_in, c_out) as in ``nnx.Conv``."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int | tuple[int, int],
        *,
        bias: bool,
        rngs: nnx.Rngs,
        dtype,
        impl: Literal["im2col", "xla"] = "im2col",
    ):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if impl not in ("im2col", "xla"):
            raise ValueError(f"impl must be 'im2col' or 'xla', got {impl!r}")
        self.kernel = _he(rngs, (kh, kw, c_in, c_out), dtype)
        self.bias = _bias(rngs, c_out, dtype) if bias else None
        self.impl = impl

    def patches(self, x):
        """The rows this layer multiplies by its kernel: (n, h*w, kh*kw*c_in)."""
        kh, kw = self.kernel.shape[:2]
        p = _im2col_same(x, kh, kw)
        return p.reshape(p.shape[0], -1, p.shape[-1])

    def __call__(self, x):
        k = self.kernel[...]
        kh, kw, c_in, c_out = k.shape
        if self.impl == "im2col":
            y = _im2col_same(x, kh, kw) @ k.reshape(kh * kw * c_in, c_out)
        else:
            y = jax.lax.conv_general_dilated(
                x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return y if self.bias is None else y + self.bias[...]


def max_pool(x: Array) -> Array:
    """2x2 max-pooling, stride 2, VALID (odd edges dropped), as reshape + max."""
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, : 2 * h2, : 2 * w2, :].reshape(n, h2, 2, w2, 2, c)
    return x.max(axis=(2, 4))


class Sequential(nnx.Module):
    """A homogeneous-by-construction stack: ``plan`` is a tuple of ops.

    Ops: ``("C", channels, kernel)`` convolution, ``("P",)`` max-pool, ``("F", width)``
    dense (flattening first where needed). Each C / F is followed by the activation;
    a final dense layer to ``num_outputs`` (no activation) is always appended.

    **Attributes:** ``order`` (L, or None when ``bias == "all"``), ``depth`` (number
    of parameterised layers), ``bias``, ``activation``, ``num_outputs``, ``in_shape``.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        plan: Sequence[tuple],
        num_outputs: int,
        *,
        bias: BiasMode = "none",
        activation: str = "relu",
        rngs: nnx.Rngs,
        dtype=jnp.float64,
        conv_impl: Literal["im2col", "xla"] = "im2col",
    ):
        if bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        in_shape = tuple(int(s) for s in in_shape)
        if not in_shape or min(in_shape) < 1:
            raise ValueError(
                f"in_shape must be a non-empty tuple of positive sizes, got {in_shape}"
            )
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.float32, jnp.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        plan = tuple(tuple(op) for op in plan) + (("F", int(num_outputs)),)
        layers, ops, shape = [], [], in_shape
        for op in plan:
            kind = op[0]
            has_bias = bias == "all" or (bias == "first" and not layers)
            if kind == "C":
                if len(shape) != 3:
                    raise ValueError(f"convolution needs (h, w, c) inputs, got shape {shape}")
                c_out, k = int(op[1]), op[2]
                layers.append(
                    Conv(shape[2], c_out, k, bias=has_bias, rngs=rngs, dtype=dtype, impl=conv_impl)
                )
                ops.append(("C", len(layers) - 1))
                shape = (shape[0], shape[1], c_out)
            elif kind == "P":
                if len(shape) != 3 or shape[0] < 2 or shape[1] < 2:
                    raise ValueError(f"cannot max-pool an activation of shape {shape}")
                ops.append(("P",))
                shape = (shape[0] // 2, shape[1] // 2, shape[2])
            elif kind == "F":
                fan_in = math.prod(shape)
                layers.append(Dense(fan_in, int(op[1]), bias=has_bias, rngs=rngs, dtype=dtype))
                ops.append(("F", len(layers) - 1))
                shape = (int(op[1]),)
            else:
                raise ValueError(f"unknown layer op {op!r}; expected C, P or F")
        self.layers = nnx.List(layers)
        self.ops = tuple(ops)
        self.in_shape = in_shape
        self.num_outputs = int(num_outputs)
        self.depth = len(layers)
        self.bias = bias
        self.activation = activation
        self.order = None if (bias == "all" and self.depth > 1) else self.depth
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        """Outputs for a batch ``x`` of shape (n, *in_shape): (n,) if one output else (n, C)."""
        return self._forward(x, None)

    def preactivations(self, x: Array) -> list[Array]:
        """The input of every activation (hidden layers only), for a batch ``x``.

        Their signs are the network's activation pattern: where one changes, a ReLU
        network's gradient (the flow's field) jumps.
        """
        found: list[Array] = []
        self._forward(x, found)
        return found

    def layer_io(self, x: Array, offsets: Sequence[Array]) -> tuple[Array, list[Array]]:
        """A forward pass with ``offsets[l]`` added to parameterised layer l's output.

        Returns ``(outputs, inputs)``; ``inputs[l]`` (n, rows, fan_in) is what layer l
        multiplies by its weight matrix (rows = 1 for a dense layer, h*w patches for a
        convolution). The gradient of a per-example quantity with respect to
        ``offsets[l]`` (zeros of layer l's output shape) is its back-propagated error
        there, so each weight gradient is ``inputs[l]^T error`` per example: the
        layer-wise Gram matrix of ``gflow.kkt`` is built from these.
        """
        inputs: list[Array] = []
        return self._forward(x, None, offsets, inputs), inputs

    def with_slopes(self, x: Array, slopes: Sequence[Array]) -> Array:
        """Outputs with the activation pattern frozen: hidden layer k's activation is
        ``slopes[k] * z`` (an array of its pre-activations' shape, e.g. ReLU's 1 / 0),
        so the network is linear in each layer given the pattern. At a kink this gives
        the one-sided fields (``gflow.kinks``); with the pattern of ``theta`` itself it
        equals ``self(x)``."""
        return self._forward(x, None, slopes=slopes)

    def _forward(
        self,
        x: Array,
        collect: list | None,
        offsets: Sequence[Array] | None = None,
        inputs: list | None = None,
        slopes: Sequence[Array] | None = None,
    ) -> Array:
        act = ACTIVATIONS[self.activation]
        hidden = 0
        n = x.shape[0]
        h = x.astype(self.dtype)
        if h.shape[1:] != self.in_shape:
            h = h.reshape(n, *self.in_shape)
        last = len(self.ops) - 1
        for i, op in enumerate(self.ops):
            if op[0] == "P":
                h = max_pool(h)
                continue
            if op[0] == "F" and h.ndim > 2:
                h = h.reshape(n, -1)
            layer = self.layers[op[1]]
            if inputs is not None:
                inputs.append(layer.patches(h) if isinstance(layer, Conv) else h[:, None, :])
            h = layer(h)
            if offsets is not None:
                h = h + offsets[op[1]]
            if i != last:
                if collect is not None:
                    collect.append(h)
                h = act(h) if slopes is None else slopes[hidden] * h
                hidden += 1
        return h[:, 0] if self.num_outputs == 1 else h


def MLP(
    in_shape: Sequence[int] | int,
    hidden: Sequence[int],
    num_outputs: int,
    **kwargs,
) -> Sequential:
    """Bias-free MLP (by default) with the given hidden widths; ``hidden=()`` is linear, L = 1."""
    in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    flat = (math.prod(in_shape),)
    return Sequential(flat, [("F", int(w)) for w in hidden], num_outputs, **kwargs)


def CNN(in_shape: Sequence[int], plan: Sequence[tuple], num_outputs: int, **kwargs) -> Sequential:
    """A conv / pool / dense stack; see ``Sequential`` for the plan format."""
    return Sequential(in_shape, plan, num_outputs, **kwargs)


PAPER_CNN_PLAN = (("C", 32, 5), ("P",), ("C", 64, 3), ("P",), ("F", 1024))


def paper_cnn(
    in_shape=(28, 28, 1), num_outputs: int = 10, *, bias: BiasMode = "first", **kwargs
) -> Sequential:
    """The paper's MNIST CNN: C32(5x5)-pool-C64(3x3)-pool-F1024-F10, SAME, He-normal, L = 4."""
    return Sequential(in_shape, PAPER_CNN_PLAN, num_outputs, bias=bias, **kwargs)


VGG16_PLAN = tuple(
    ("P",) if c == "P" else ("C", c, 3)
    for c in (
        64,
        64,
        "P",
        128,
        128,
        "P",
        256,
        256,
        256,
        "P",
        512,
        512,
        512,
        "P",
        512,
        512,
        512,
        "P",
    )
)


def vgg16(
    in_shape=(32, 32, 3), num_outputs: int = 10, *, bias: BiasMode = "first", **kwargs
) -> Sequential:
    """VGG-16 for CIFAR-10 as in the paper's code: 13 convolutions + one dense, L = 14.

    No batch norm, no dropout; 5 max-pools take 32x32 to 1x1.
    """
    return Sequential(in_shape, VGG16_PLAN, num_outputs, bias=bias, **kwargs)


MODELS = ("linear", "mlp", "cnn", "paper-cnn", "vgg16")


def build_model(
    name: str,
    in_shape: Sequence[int],
    num_outputs: int,
    *,
    width: int = 64,
    depth: int = 2,
    bias: BiasMode = "none",
    activation: str = "relu",
    seed: int = 0,
    dtype=jnp.float64,
) -> Sequential:
    """Build a model by name (one of ``MODELS``).

    ``depth`` counts parameterised layers for ``mlp`` (depth 2 = one hidden layer of
    ``width``) and convolution blocks (conv + pool, ``width`` channels) for ``cnn``.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    rngs = nnx.Rngs(params=seed)
    kw = dict(bias=bias, activation=activation, rngs=rngs, dtype=dtype)
    if name == "linear":
        return MLP(in_shape, (), num_outputs, **kw)
    if name == "mlp":
        return MLP(in_shape, (width,) * (depth - 1), num_outputs, **kw)
    if name == "cnn":
        plan = [op for _ in range(depth) for op in (("C", width, 3), ("P",))]
        return CNN(in_shape, plan, num_outputs, **kw)
    if name == "paper-cnn":
        return paper_cnn(in_shape, num_outputs, **kw)
    if name == "vgg16":
        return vgg16(in_shape, num_outputs, **kw)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def split_params(model: nnx.Module):
    """``(graphdef, params)`` with ``params`` a plain nested dict of arrays."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def apply(graphdef, params, x: Array) -> Array:
    """Pure forward pass: the model's outputs at parameters ``params``, (n,) for one
    output (a model returning (n, 1), as ``nnx.Linear(h, 1)`` does, is read as (n,)) or
    (n, C). ``graphdef``: an ``nnx.GraphDef`` (from ``split_params``) or a pure function
    ``apply_fn(params, x)``."""
    out = graphdef(params, x) if callable(graphdef) else nnx.merge(graphdef, params)(x)
    return out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out


def leaf_layers(params) -> tuple[int, ...]:
    """The layer of each parameter array, in ``jax.tree.leaves`` order. A layer is the
    group of arrays that share a parent in the pytree (a kernel and its bias), which
    holds for gflow's models, ``nnx.Linear`` / ``nnx.Conv`` stacks and most others."""
    parents = [tuple(p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    order = list(dict.fromkeys(parents))
    return tuple(order.index(p) for p in parents)


def layer_sq_norms(params) -> Array:
    """``||theta_l||^2`` of each layer (``leaf_layers``), in order."""
    layers, leaves = leaf_layers(params), jax.tree.leaves(params)
    return jnp.stack([
        sum(jnp.sum(jnp.square(a)) for a, g in zip(leaves, layers, strict=True) if g == l)
        for l in range(max(layers) + 1)
    ])  # fmt: skip


def layer_norms(params) -> Array:
    """Frobenius norm of each parameterised layer (``leaf_layers``), in order."""
    return jnp.sqrt(layer_sq_norms(params))


def params_dtype(params):
    """The floating dtype of a parameter pytree (its first floating leaf's)."""
    for leaf in jax.tree.leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.dtype(leaf.dtype)
    raise ValueError("the parameters hold no floating-point array")


def check_finite_params(params, name: str = "params0") -> None:
    """Raise a ``ValueError`` naming the first leaf of ``params`` that holds NaN or inf
    (``"params0 holds NaN in leaf ['layers'][0]['kernel']"``). Read on the host (no
    compilation); a leaf no process holds whole (multi-host) is reduced where it lives."""
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not jnp.issubdtype(jnp.result_type(a), jnp.inexact):
            continue
        if getattr(a, "is_fully_addressable", True):
            host = np.asarray(a)
            if np.isfinite(host).all():
                continue
            kind = "NaN" if np.isnan(host).any() else "inf"
        else:
            if bool(jnp.isfinite(a).all()):
                continue
            kind = "NaN" if bool(jnp.isnan(a).any()) else "inf"
        raise ValueError(f"{name} holds {kind} in leaf {jax.tree_util.keystr(path)}")


class HomogeneityReport(NamedTuple):
    """Result of ``check_homogeneity``.

    ``order``: the order tested (declared, or the depth for a non-homogeneous model);
    ``max_rel_error``: worst ``|Phi(c theta) - c^L Phi(theta)| / |c^L Phi(theta)|`` over c;
    ``estimated_order``: ``log(|Phi(c theta)| / |Phi(theta)|) / log c`` at the largest c;
    ``homogeneous``: error below the dtype's tolerance.
    """

    order: int
    max_rel_error: float
    estimated_order: float
    homogeneous: bool


def check_homogeneity(
    model,
    x: Array,
    scales: Sequence[float] = (0.5, 2.0, 7.5),
    order: int | None = None,
    *,
    params=None,
) -> HomogeneityReport:
    """Check ``Phi(c theta; x) = c^L Phi(theta; x)`` numerically for each ``c`` in ``scales``.

    ``model``: an ``nnx.Module``, or a pure ``apply_fn(params, x)`` (or an ``nnx.GraphDef``)
    with ``params``.
    ``order`` defaults to a gflow model's declared order, or its depth for one that
    declares none (bias in every layer), so that the broken homogeneity shows up as a
    large error; another model's order must be given.
    """
    if isinstance(model, nnx.Module):
        graphdef, params = split_params(model)
    elif params is not None:  # apply_fn(params, x), or an nnx.GraphDef
        graphdef = model
    else:
        raise TypeError("model must be an nnx.Module, or a function apply_fn(params, x) "
                        "given with params=")  # fmt: skip
    if order is None:
        if not isinstance(model, Sequential):
            raise ValueError(
                f"give order=L to check a model gflow did not build ({type(model).__name__})"
            )
        order = model.order or model.depth
    L = order
    # NaN parameters would read as a wrong order ("scaling as c^nan"): say what they are
    check_finite_params(params, "params")
    x = jnp.asarray(x)
    fwd = jax.jit(apply, static_argnums=0)
    base = np.asarray(fwd(graphdef, params, x), dtype=np.float64)
    ref_norm = np.linalg.norm(base)
    if not np.isfinite(ref_norm):
        raise ValueError("model output on x is not finite (NaN or inf in x, or overflow)")
    if ref_norm == 0:
        raise ValueError("model output is identically zero on x; pick other inputs")
    errs, est = [], float("nan")
    for c in scales:
        scaled = jax.tree.map(lambda a, c=c: a * jnp.asarray(c, a.dtype), params)
        out = np.asarray(fwd(graphdef, scaled, x), dtype=np.float64)
        errs.append(np.linalg.norm(out - c**L * base) / (c**L * ref_norm))
        if c != 1:
            est = math.log(np.linalg.norm(out) / ref_norm) / math.log(c)
    tol = 1e-9 if params_dtype(params) == jnp.float64 else 1e-4
    worst = float(max(errs))
    return HomogeneityReport(int(L), worst, float(est), worst <= tol)
