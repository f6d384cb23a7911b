"""A model as data: what a run folder keeps so that its model is rebuilt without running
code from the folder.

A run folder is what collaborators send each other, so everything ``gflow check``,
``gflow attack`` and ``gflow compare`` read from it is data (JSON and ``.npz`` read
without pickle). A model is kept as its **spec**: ``{"factory": "module:name",
"kwargs": {...}}``, JSON values only. gflow's own models (``gflow.models.Sequential``,
which ``MLP``, ``CNN``, ``paper_cnn``, ``vgg16`` and ``build_model`` all return) give
theirs themselves; a model of the user's own is kept this way when
``make_objective(..., spec=("package.module:ModelClass", kwargs))`` names an installed
``nnx.Module`` class that rebuilds it as ``ModelClass(**kwargs, rngs=nnx.Rngs(0))``
(checked there: same structure, same parameter shapes).

Rebuilding resolves ``factory`` from **installed** modules only: a module that the
current folder or the run folder would shadow (``python -m gflow`` puts the current
folder first on ``sys.path``) is refused, and the name must be an ``nnx.Module`` class
(or one of gflow's model builders), never an arbitrary function. Importing an installed
module runs that module's code, which is the user's own installation, not the folder's.

A model that has no spec (a pure ``apply_fn``, a class defined in a script) is kept as
``objective.pkl``, a cloudpickle: code, which ``gflow.objective.load_objective`` loads
only when asked to (``trust_code=True``, ``--trust-code``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

__all__ = ["SEQUENTIAL", "sequential_spec", "as_spec", "build", "resolve", "spec_text"]

SEQUENTIAL = "gflow.models:Sequential"
_BUILDERS = ("gflow.models:MLP", "gflow.models:CNN", "gflow.models:paper_cnn",
             "gflow.models:vgg16")  # fmt: skip


def sequential_spec(model) -> dict:
    """The spec of a ``gflow.models.Sequential``, read from its layers: the plan that
    built it (widths and kernels from the kernels' shapes) and its options."""
    from gflow.models import Conv

    plan = []
    for op in model.ops[:-1]:  # the last is the output layer Sequential appends
        if op[0] == "P":
            plan.append(["P"])
            continue
        shape = tuple(int(s) for s in model.layers[op[1]].kernel.shape)
        plan.append(["C", shape[3], [shape[0], shape[1]]] if op[0] == "C" else ["F", shape[1]])
    impl = next((layer.impl for layer in model.layers if isinstance(layer, Conv)), "im2col")
    kwargs = dict(in_shape=list(model.in_shape), plan=plan, num_outputs=int(model.num_outputs),
                  bias=model.bias, activation=model.activation,
                  dtype=np.dtype(model.dtype).name, conv_impl=impl)  # fmt: skip
    return {"factory": SEQUENTIAL, "kwargs": kwargs}


def as_spec(spec) -> dict:
    """``spec`` as ``{"factory": str, "kwargs": dict}``, from that dict, a pair
    ``(factory, kwargs)`` or a factory name alone; ``ValueError`` unless its kwargs are
    JSON values that read back as they are."""
    if isinstance(spec, str):
        spec = {"factory": spec, "kwargs": {}}
    elif isinstance(spec, tuple) and len(spec) == 2:
        spec = {"factory": spec[0], "kwargs": spec[1]}
    if not (isinstance(spec, dict) and set(spec) == {"factory", "kwargs"}):
        raise ValueError(f"a model spec is ('module:Name', {{kwargs}}), got {spec!r}")
    factory, kwargs = spec["factory"], spec["kwargs"]
    mod, _, name = factory.partition(":") if isinstance(factory, str) else ("", "", "")
    if not mod or not name:
        raise ValueError(f"a model spec's factory is 'module:Name', got {factory!r}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"a model spec's kwargs are a dict, got {type(kwargs).__name__}")
    try:
        text = json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"a model spec's kwargs must be JSON values ({e})") from None
    return {"factory": factory, "kwargs": json.loads(text)}


def resolve(factory: str, folder: str | os.PathLike | None = None):
    """The class (or gflow builder) ``factory`` names, imported from installed modules
    only; ``ValueError`` for anything else (see the module docstring)."""
    from flax import nnx

    mod, _, qualname = factory.partition(":")
    top = mod.split(".")[0]
    if top == "__main__" or not top.isidentifier():
        raise ValueError(f"model factory {factory!r} is not in an installed module")
    if top not in sys.modules:
        found = importlib.util.find_spec(top)  # a top-level name: nothing is imported
        where = None if found is None else (found.origin or next(
            iter(found.submodule_search_locations or ()), None))  # fmt: skip
        cwd_first = bool({"", os.getcwd()} & set(sys.path))  # python -m: the current folder
        if where is None or _inside(where, folder) or (cwd_first and _inside(where, ".")):
            raise ValueError(f"model factory {factory!r}: module {top!r} is not installed "
                             f"(found: {where or 'nowhere'}); gflow does not import it from "
                             "a run folder or the current folder")  # fmt: skip
    try:
        obj = importlib.import_module(mod)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model factory {factory!r} cannot be found ({e})") from None
    if not (isinstance(obj, type) and issubclass(obj, nnx.Module)) and factory not in _BUILDERS:
        raise ValueError(f"model factory {factory!r} is not an nnx.Module class")
    return obj


def _inside(path: str, folder) -> bool:
    """Whether ``path`` lies in ``folder`` (links resolved)."""
    if not folder or not path:
        return False
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True


def build(spec, folder=None):
    """The model ``spec`` describes, built from installed code (``resolve``) with
    ``rngs=nnx.Rngs(0)`` (its parameters are the run's, read separately)."""
    from flax import nnx

    spec = as_spec(spec)
    factory = resolve(spec["factory"], folder)
    try:
        return factory(**spec["kwargs"], rngs=nnx.Rngs(0))
    except (TypeError, ValueError) as e:
        raise ValueError(f"model spec {spec['factory']} does not build ({e})") from None


def spec_text(model, spec=None) -> str | None:
    """The JSON text ``Objective.spec`` keeps for ``model``: ``spec`` (checked to rebuild
    ``model``'s structure and parameter shapes), else gflow's own model's, else None."""
    from gflow.models import Sequential, split_params

    if spec is None:
        if not isinstance(model, Sequential):
            return None
        spec = sequential_spec(model)
    else:
        spec = as_spec(spec)
        graphdef, params = split_params(model)
        again, params2 = split_params(build(spec))
        shapes = [jax.tree.map(lambda a: (a.shape, a.dtype.name), p) for p in (params, params2)]
        if graphdef != again or shapes[0] != shapes[1]:
            raise ValueError(f"spec {spec['factory']} with {spec['kwargs']} builds a model "
                             "of another structure or other parameter shapes than the one "
                             "given")
    return json.dumps(spec, sort_keys=True)
