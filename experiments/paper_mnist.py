"""The paper's MNIST experiment: normalized margins under a constant step and under the
loss-based schedule, the same epochs for both (docs/theory.md, "The paper's experiments").

The paper's CNN (C32(5x5)-pool-C64(3x3)-pool-F1024-F10, ReLU, SAME, bias in the first
layer only, L = 4, He-normal), cross-entropy, SGD with batch 100:

- constant step ``--lr`` (0.01, as in the paper, on the batch-mean loss; gflow steps on
  the sum loss, so the step it takes is ``lr / N``);
- the loss-based schedule ``alpha / Loss`` (alpha0 0.1, x2^(1/5) after a good epoch,
  /2^(1/10) and roll back after a bad one).

Records per save point the loss, both normalized margins (``q_min / rho^L`` and the
layer-wise ``q_min / prod |W_i|``), the training accuracy; keeps checkpoints at the first
epochs whose mean training loss falls below 1e-10, 1e-15, 1e-20 and 1e-120 and at the end,
with their held-out accuracy. Writes one run folder per schedule, ``summary.json`` and a
figure.

Scales:

- ``--scale cpu`` (default): 500 training images from mnist5k, channels 16/32/256
  instead of 32/64/1024, 300 epochs, float32. About 15-20 minutes on 2 cores.
- ``--scale paper``: 60,000 images (``--data mnist-idx:DIR``), the paper's widths,
  10,000 epochs: an accelerator's job.

Any of ``--train``, ``--channels``, ``--epochs`` overrides the scale.

    python experiments/paper_mnist.py                          # CPU scale
    python experiments/paper_mnist.py --scale paper --data mnist-idx:/data/mnist
"""

from __future__ import annotations

import argparse
import math

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    add_sgd_options,
    held_out_accuracy,
    out_dir,
    save_experiment_figure,
    train_schedule,
    write_json,
)
from flax import nnx  # noqa: E402

from gflow import data as D  # noqa: E402
from gflow.models import Sequential  # noqa: E402
from gflow.objective import make_objective  # noqa: E402

SCALES = {
    "cpu": dict(data="mnist5k", train=500, test=1000, channels="16,32,256", epochs=300),
    "paper": dict(data=None, train=60000, test=10000, channels="32,64,1024", epochs=10000),
}


def split(spec: str, n_train: int, n_test: int, seed: int):
    if spec.startswith("mnist-idx:"):
        train = D.load(spec, split="train")
        test = D.load(spec, split="test")
        return D.sample(train, n_train, seed), D.sample(test, n_test, seed)
    ds = D.load(spec)
    perm = np.random.default_rng(seed).permutation(len(ds))
    if n_train + n_test > len(ds):
        raise SystemExit(f"{spec} has {len(ds)} images: fewer than --train + --test")
    a, b = perm[:n_train], perm[n_train : n_train + n_test]
    return (
        D.Dataset(ds.x[a], ds.y[a], ds.num_classes, f"{ds.name}[train {n_train}]"),
        D.Dataset(ds.x[b], ds.y[b], ds.num_classes, f"{ds.name}[test {n_test}]"),
    )


def cnn(channels, dtype, seed):
    c1, c2, f = channels
    plan = (("C", c1, 5), ("P",), ("C", c2, 3), ("P",), ("F", f))
    return Sequential((28, 28, 1), plan, 10, bias="first", rngs=nnx.Rngs(params=seed), dtype=dtype)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--data", default=None)
    ap.add_argument("--train", type=int, default=None)
    ap.add_argument("--test", type=int, default=None)
    ap.add_argument("--channels", default=None, help="conv1,conv2,dense widths")
    ap.add_argument("--epochs", type=int, default=None)
    add_sgd_options(ap, lr=0.01, loss_ub=600.0)
    args = ap.parse_args()
    sc = dict(SCALES[args.scale])
    for k in ("data", "train", "test", "channels", "epochs"):
        if getattr(args, k) is not None:
            sc[k] = getattr(args, k)
    if sc["data"] is None:
        raise SystemExit("--scale paper needs --data mnist-idx:DIR (full MNIST on disk)")
    channels = tuple(int(c) for c in str(sc["channels"]).split(","))
    dtype = jnp.float32 if args.dtype == "float32" else jnp.float64
    out = out_dir("paper_mnist", args.out)
    train, test = split(sc["data"], sc["train"], sc["test"], args.seed)
    n = len(train)
    per_epoch = n // args.batch  # gflow counts SGD steps
    print(
        f"scale {args.scale}: {train.name}, {test.name}, channels {channels}, "
        f"{sc['epochs']} epochs, batch {args.batch}, {args.dtype}"
    )
    summary = dict(scale=args.scale, settings=sc, channels=channels, dtype=args.dtype, runs={})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    for schedule in ("constant", "loss-based"):
        model = cnn(channels, dtype, args.seed)
        obj, p0 = make_objective(model, train, "ce")
        tr, wall = train_schedule(
            obj,
            p0,
            schedule,
            lr_mean=args.lr,
            alpha0=args.alpha0,
            loss_ub=args.loss_ub,
            batch=args.batch,
            epochs=sc["epochs"],
            saves=args.saves,
            seed=args.seed,
            config=dict(experiment="paper_mnist", scale=args.scale, **sc),
        )
        tr.save(out / schedule)
        cks = {}
        for label, ck in tr.checkpoints.items():
            mean_mark = math.exp(float(label) - math.log(n))
            cks[f"{mean_mark:.0e}"] = dict(
                epoch=ck["step"] // per_epoch,
                test_accuracy=held_out_accuracy(obj, ck["params"], test),
            )
        ep = tr["step"] / per_epoch
        cks["end"] = dict(
            epoch=int(ep[-1]), test_accuracy=held_out_accuracy(obj, tr.final_params, test)
        )
        fitted = np.nonzero(tr["accuracy"] >= 1.0)[0]
        summary["runs"][schedule] = dict(
            wall_s=wall,
            status=tr.status,
            message=tr.message,
            epochs=int(ep[-1]),
            final_log_loss_mean=float(tr["log_loss_mean"][-1]),
            final_layerwise_margin=float(tr["layerwise_margin"][-1]),
            final_normalized_margin=float(tr["normalized_margin"][-1]),
            first_fitted_epoch=int(ep[fitted[0]]) if fitted.size else None,
            margin_at_fit=float(tr["layerwise_margin"][fitted[0]]) if fitted.size else None,
            checkpoints=cks,
        )
        r = summary["runs"][schedule]
        print(
            f"{schedule}: {tr.status} after {r['epochs']} epochs ({wall:.0f} s); mean loss "
            f"e^{r['final_log_loss_mean']:.4g}; layer-wise margin "
            f"{r['final_layerwise_margin']:.4g} (at fit, epoch {r['first_fitted_epoch']}: "
            f"{r['margin_at_fit']})"
        )
        for k, v in cks.items():
            print(f"  checkpoint {k}: epoch {v['epoch']}, test accuracy {v['test_accuracy']:.4f}")
        axes[0].plot(ep, tr["log_loss_mean"] / math.log(10), label=schedule)
        axes[1].plot(ep, tr["layerwise_margin"], label=schedule)
        axes[2].plot(ep, tr["normalized_margin"], label=schedule)
    c, lb = summary["runs"]["constant"], summary["runs"]["loss-based"]
    summary["ratio_layerwise_margin"] = lb["final_layerwise_margin"] / c["final_layerwise_margin"]
    print(
        f"loss-based / constant layer-wise margin after the same epochs: "
        f"{summary['ratio_layerwise_margin']:.3g}"
    )
    axes[0].set_title("log10 mean training loss")
    axes[1].set_title(r"layer-wise margin $q_{min}/\prod\|W_i\|$")
    axes[2].set_title(r"normalized margin $q_{min}/\rho^L$")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("symlog", linthresh=1e-6)
    axes[2].set_yscale("symlog", linthresh=1e-8)
    axes[0].legend()
    fig.suptitle(f"paper CNN on {train.name}, channels {channels}, {args.dtype}", fontsize=10)
    fig_path = save_experiment_figure(fig, f"paper_mnist-{args.scale}.png")
    write_json(out / "summary.json", summary)
    print(f"-> {out}, {fig_path}")


if __name__ == "__main__":
    main()
