"""Models: homogeneity to float64 rounding, Euler's identity, conv / pool formulations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gflow.models import (
    CNN,
    MLP,
    Conv,
    apply,
    build_model,
    check_homogeneity,
    layer_norms,
    max_pool,
    paper_cnn,
    split_params,
    vgg16,
)
from tests.conftest import rel_err

SMALL = [
    ("linear", (6, 6, 1), dict()),
    ("mlp", (6, 6, 1), dict(width=7, depth=2)),
    ("mlp", (6, 6, 1), dict(width=5, depth=4)),
    ("cnn", (8, 8, 2), dict(width=3, depth=2)),
]


def _x(shape, n=5, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, *shape), jnp.float64)


@pytest.mark.parametrize("bias", ["none", "first"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "linear"])
@pytest.mark.parametrize("name,shape,kw", SMALL, ids=[s[0] + str(i) for i, s in enumerate(SMALL)])
def test_homogeneous_models(name, shape, kw, bias, activation):
    model = build_model(name, shape, 3, bias=bias, activation=activation, **kw)
    rep = check_homogeneity(model, _x(shape))
    assert rep.order == model.order == model.depth
    assert rep.max_rel_error <= 1e-12
    assert rep.homogeneous
    assert abs(rep.estimated_order - model.order) < 1e-10


@pytest.mark.parametrize("bias", ["none", "first"])
def test_paper_cnn_is_homogeneous_of_order_4(bias):
    model = paper_cnn(bias=bias, rngs=nnx.Rngs(0))
    assert model.order == 4
    rep = check_homogeneity(model, _x((28, 28, 1), n=2))
    assert rep.max_rel_error <= 1e-12 and rep.homogeneous


def test_vgg16_is_homogeneous_of_order_14():
    model = vgg16(bias="first", rngs=nnx.Rngs(0))
    assert model.order == 14 and model.depth == 14
    rep = check_homogeneity(model, _x((32, 32, 3), n=1), scales=(0.5, 1.7))
    assert rep.max_rel_error <= 1e-12 and rep.homogeneous


@pytest.mark.parametrize("name,shape,kw", SMALL[1:], ids=["mlp2", "mlp4", "cnn"])
def test_bias_everywhere_breaks_homogeneity(name, shape, kw):
    model = build_model(name, shape, 3, bias="all", **kw)
    assert model.order is None
    rep = check_homogeneity(model, _x(shape))
    assert not rep.homogeneous
    assert rep.max_rel_error > 1e-3


def test_wrong_declared_order_is_caught():
    model = build_model("mlp", (6,), 1, width=4, depth=3)
    rep = check_homogeneity(model, _x((6,)), order=2)
    assert not rep.homogeneous and abs(rep.estimated_order - 3) < 1e-10


def test_euler_identity():
    # <grad_theta Phi(theta; x), theta> = L Phi(theta; x)
    model = build_model("cnn", (8, 8, 1), 1, width=3, depth=2, bias="first")
    g, p = split_params(model)
    x = _x((8, 8, 1), n=1)
    phi = lambda p: apply(g, p, x)[0]
    grad = jax.grad(phi)(p)
    inner = optax.tree.vdot(grad, p)
    assert abs(inner - model.order * phi(p)) <= 1e-12 * abs(phi(p))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_im2col_conv_equals_nnx_conv(k):
    x = _x((9, 7, 3), n=2)
    ours = Conv(3, 4, k, bias=True, rngs=nnx.Rngs(0), dtype=jnp.float64)
    xla = Conv(3, 4, k, bias=True, rngs=nnx.Rngs(0), dtype=jnp.float64, impl="xla")
    ref = nnx.Conv(3, 4, (k, k), padding="SAME", rngs=nnx.Rngs(1), param_dtype=jnp.float64)
    ref.kernel[...] = ours.kernel[...]
    ref.bias[...] = ours.bias[...]
    want = ref(x)
    assert rel_err(ours(x), want) < 1e-14
    assert rel_err(xla(x), want) < 1e-14


def test_max_pool_equals_flax():
    x = _x((9, 8, 2), n=3)
    assert max_pool(x).shape == (3, 4, 4, 2)
    assert rel_err(max_pool(x), nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")) == 0


def test_layer_norms_and_structure():
    model = CNN((8, 8, 1), [("C", 3, 3), ("P",), ("F", 5)], 2, bias="first", rngs=nnx.Rngs(0))
    g, p = split_params(model)
    assert sorted(p["layers"]) == [0, 1, 2]
    assert "bias" in p["layers"][0] and "bias" not in p["layers"][1]
    want = [
        np.sqrt(sum(np.sum(np.asarray(a) ** 2) for a in jax.tree.leaves(p["layers"][i])))
        for i in range(3)
    ]
    assert rel_err(layer_norms(p), want) < 1e-15
    assert apply(g, p, _x((8, 8, 1))).shape == (5, 2)


def test_single_output_is_squeezed_and_float32_works():
    model = MLP(4, (3,), 1, rngs=nnx.Rngs(0), dtype=jnp.float32)
    g, p = split_params(model)
    out = apply(g, p, jnp.ones((6, 4), jnp.float32))
    assert out.shape == (6,) and out.dtype == jnp.float32
    rep = check_homogeneity(model, jnp.ones((6, 4), jnp.float32) + jnp.arange(4, dtype=jnp.float32))
    assert rep.homogeneous


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="resnet"), "unknown model 'resnet'"),
        (dict(name="mlp", bias="some"), "bias must be one of"),
        (dict(name="mlp", activation="tanh"), "activation must be one of"),
        (dict(name="mlp", width=0), "width must be >= 1, got 0"),
        (dict(name="mlp", dtype=jnp.float16), "dtype must be float32 or float64"),
        (dict(name="cnn", shape=(10,)), "convolution needs"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    shape = kwargs.pop("shape", (4, 4, 1))
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_model(name, shape, 2, **kwargs)


def test_he_normal_init_statistics_and_seeding():
    a = build_model("mlp", (400,), 1, width=300, depth=2, seed=3)
    b = build_model("mlp", (400,), 1, width=300, depth=2, seed=3)
    c = build_model("mlp", (400,), 1, width=300, depth=2, seed=4)
    k = np.asarray(a.layers[0].kernel[...])
    assert abs(k.std() / np.sqrt(2 / 400) - 1) < 0.01 and abs(k.mean()) < 3e-3
    assert np.array_equal(k, np.asarray(b.layers[0].kernel[...]))
    assert not np.array_equal(k, np.asarray(c.layers[0].kernel[...]))


def test_preactivations_are_the_hidden_layer_inputs():
    model = build_model("mlp", (6,), 1, width=4, depth=3)
    g, p = split_params(model)
    x = _x((6,), n=3)
    pre = nnx.merge(g, p).preactivations(x)
    assert [a.shape for a in pre] == [(3, 4), (3, 4)]
    w0, w1 = p["layers"][0]["kernel"], p["layers"][1]["kernel"]
    assert rel_err(pre[0], x @ w0) < 1e-15
    assert rel_err(pre[1], jax.nn.relu(x @ w0) @ w1) < 1e-15
