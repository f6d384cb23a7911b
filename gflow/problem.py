"""The main job's problem: data, model, loss, seed, precision and devices, in one spec.

``Problem`` is what ``gflow run``'s problem options describe, as a small validated,
immutable value: ``Problem().build()`` gives ``(dataset, model, objective, params0)``;
``Problem.from_config(run_config)`` rebuilds a saved run's problem. Its defaults are the
command line's (``gflow run --help``): the CLI takes them from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["Problem", "RUN_DEFAULTS"]


@dataclass(frozen=True)
class Problem:
    """A problem of gflow's own models on a named data source.

    **Fields:** ``data`` (a source of ``gflow.data.load``), ``classes`` (the classes kept,
    or ``"all"``), ``n`` (samples, a seeded subset), ``scale`` ("none" or "unit"),
    ``model`` / ``width`` / ``depth`` / ``bias`` / ``activation`` (``build_model``),
    ``order`` (a declared homogeneity order, checked; None: the model's own), ``loss``,
    ``seed`` (subset and initialisation), ``dtype`` ("float64" or "float32"), ``devices``
    (None: one device; ``"auto"``: every device, or the most that divide ``n``; a count).
    """

    data: str = "mnist5k"
    classes: tuple[int, ...] | str = (0, 1)
    n: int = 300
    scale: str = "unit"
    model: str = "mlp"
    width: int = 50
    depth: int = 2
    bias: str = "none"
    activation: str = "relu"
    order: int | None = None
    loss: str = "logistic"
    seed: int = 0
    dtype: str = "float64"
    devices: int | str | None = field(default=None, compare=False)

    def __post_init__(self):
        if isinstance(self.classes, list):
            object.__setattr__(self, "classes", tuple(self.classes))
        if self.dtype not in ("float64", "float32"):
            raise ValueError(f"dtype must be 'float64' or 'float32', got {self.dtype!r}")
        if self.scale not in ("none", "unit"):
            raise ValueError(f"scale must be 'none' or 'unit', got {self.scale!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")

    def dataset(self):
        """The training data: loaded, classes kept, a seeded subset of ``n``, scaled."""
        from gflow import data as D

        ds = D.load(self.data, seed=self.seed, n=max(self.n, 2))
        if self.classes != "all":
            ds = D.keep_classes(ds, self.classes)
        if self.n > len(ds):  # (a silent cap would run on fewer samples than asked for)
            raise ValueError(f"--n {self.n}: {ds.name} has only {len(ds)} samples")
        return D.normalize(D.sample(ds, self.n, seed=self.seed), self.scale)

    def make_model(self, ds, seed: int | None = None):
        """The model for ``ds``, initialised from ``seed`` (default: the problem's)."""
        import jax.numpy as jnp

        from gflow.models import build_model

        return build_model(
            self.model,
            ds.input_shape,
            1 if self.loss in ("exp", "logistic") else ds.num_classes,
            width=self.width,
            depth=self.depth,
            bias=self.bias,
            activation=self.activation,
            seed=self.seed if seed is None else seed,
            dtype=jnp.float64 if self.dtype == "float64" else jnp.float32,
        )

    def build(self):
        """``(dataset, model, objective, params0)``."""
        from gflow.objective import make_objective, shard

        ds = self.dataset()
        model = self.make_model(ds)
        obj, params = make_objective(model, ds, self.loss, order=self.order)
        if self.devices is not None:
            obj = shard(obj, _device_count(self.devices, obj.num_samples))
        return ds, model, obj, params

    def replace(self, **changes) -> Problem:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, cfg: dict) -> Problem | None:
        """The problem of a run's config (``gflow run``'s options), or None when the config
        does not describe one (a library run of one's own model)."""
        need = ("data", "classes", "n", "scale", "model", "width", "depth", "bias", "loss")
        if any(k not in cfg for k in need):
            return None
        names = {f.name for f in dataclasses.fields(cls)} - {"order", "devices"}
        kw = {k: cfg[k] for k in names if k in cfg}
        return cls(**kw, order=cfg.get("declared_order"))


def _device_count(requested, n: int) -> int:
    """``devices``: as requested, else (``"auto"``) all devices or the most that divide
    ``n``."""
    import jax

    if requested != "auto":
        return int(requested)
    k = jax.device_count()
    while n % k:
        k -= 1
    return k


# gflow run's problem defaults (its --help shows them)
RUN_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(Problem)
    if f.name in ("data", "classes", "n", "scale", "model", "width", "depth", "loss")
}
