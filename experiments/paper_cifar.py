"""The paper's CIFAR-10 experiment: VGG-16 (no batch norm, no dropout, bias in the first
layer, L = 14), cross-entropy, SGD batch 100, constant step against the loss-based
schedule, the same epochs for both (docs/theory.md, "The paper's experiments").

Reads the CIFAR-10 python batches from ``--data cifar10:DIR`` (never downloads). The
full run (50,000 images, 10,000 epochs) is an accelerator's job; ``--train``,
``--epochs`` and ``--width`` (a fraction of VGG's channel counts) shrink it, which is how
the test runs it on a tiny generated set. Records the loss, both normalized margins and
the training accuracy, with checkpoints at the first epochs whose mean loss falls below
1e-10, 1e-15, 1e-20, 1e-120, and the held-out accuracy at the end. Writes one run folder
per schedule and ``summary.json``.

    python experiments/paper_cifar.py --data cifar10:/data/cifar-10-batches-py
    python experiments/paper_cifar.py --data cifar10:DIR --train 500 --epochs 50 --width 0.25
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
from common import add_sgd_options, held_out_accuracy, out_dir, train_schedule, write_json
from flax import nnx

from gflow import data as D
from gflow.models import VGG16_PLAN, Sequential
from gflow.objective import make_objective


def vgg(width: float, dtype, seed: int) -> Sequential:
    plan = tuple(
        op if op[0] == "P" else ("C", max(1, round(op[1] * width)), op[2]) for op in VGG16_PLAN
    )
    return Sequential((32, 32, 3), plan, 10, bias="first", rngs=nnx.Rngs(params=seed), dtype=dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True, help="cifar10:DIR")
    ap.add_argument("--train", type=int, default=50_000)
    ap.add_argument("--test", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=10_000)
    ap.add_argument("--width", type=float, default=1.0, help="fraction of VGG-16's channels")
    add_sgd_options(ap, lr=0.1, loss_ub=500.0)
    args = ap.parse_args(argv)
    if not args.data.startswith("cifar10:"):
        raise SystemExit("--data must be cifar10:DIR")
    train = D.sample(D.load(args.data, split="train"), args.train, args.seed)
    test = D.sample(D.load(args.data, split="test"), args.test, args.seed)
    dtype = jnp.float32 if args.dtype == "float32" else jnp.float64
    n = len(train)
    batch = min(args.batch, n)
    per_epoch = n // batch
    out = out_dir("paper_cifar", args.out)
    print(
        f"{train.name}, {test.name}, VGG-16 x{args.width:g} (L = 14), {args.epochs} epochs, "
        f"batch {batch}, {args.dtype}"
    )
    summary = dict(args=vars(args), runs={})
    for schedule in ("constant", "loss-based"):
        model = vgg(args.width, dtype, args.seed)
        obj, p0 = make_objective(model, train, "ce")
        tr, wall = train_schedule(
            obj,
            p0,
            schedule,
            lr_mean=args.lr,
            alpha0=args.alpha0,
            loss_ub=args.loss_ub,
            batch=batch,
            epochs=args.epochs,
            saves=args.saves,
            seed=args.seed,
            config=dict(experiment="paper_cifar", **vars(args)),
        )
        tr.save(out / schedule, objective=False)  # 50k images: rebuilt from options
        test_acc = held_out_accuracy(obj, tr.final_params, test)
        summary["runs"][schedule] = dict(
            wall_s=wall,
            status=tr.status,
            epochs=int(tr["step"][-1]) // per_epoch,
            final_log_loss_mean=float(tr["log_loss_mean"][-1]),
            final_layerwise_margin=float(tr["layerwise_margin"][-1]),
            final_normalized_margin=float(tr["normalized_margin"][-1]),
            train_accuracy=float(tr["accuracy"][-1]),
            test_accuracy=test_acc,
            checkpoints={k: v["step"] // per_epoch for k, v in tr.checkpoints.items()},
        )
        r = summary["runs"][schedule]
        print(
            f"{schedule}: {tr.status}, {r['epochs']} epochs, {wall:.0f} s; mean loss "
            f"e^{r['final_log_loss_mean']:.4g}; layer-wise margin "
            f"{r['final_layerwise_margin']:.4g}; test accuracy {test_acc:.3f}"
        )
    write_json(out / "summary.json", summary)
    print(f"-> {out}")
    return summary


if __name__ == "__main__":
    main()
