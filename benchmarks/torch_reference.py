"""PyTorch twins of gflow's benchmark models and their full-batch SGD step.

torch is a benchmark-only, optional dependency (``pip install torch``): without it the
functions here return None and the scripts leave the reference rows out. The twins use
the same layouts, initial-bias placement and summed losses as gflow's models, so one
step does the same arithmetic.
"""

from __future__ import annotations

import time

import numpy as np


def torch_net(kind: str, in_features: int = 784, width: int = 50):
    """PyTorch's twin of a gflow model: "paper-cnn", "vgg16" or "mlp" (bias-free MLP)."""
    import torch

    nn = torch.nn
    if kind == "paper-cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(7 * 7 * 64, 1024, bias=False),
            nn.ReLU(),
            nn.Linear(1024, 10, bias=False),
        )
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, width, bias=False),
            nn.ReLU(),
            nn.Linear(width, 1, bias=False),
        )
    layers, c = [], 3
    for i, v in enumerate(
        (64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512, "P")
    ):
        if v == "P":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=i == 0), nn.ReLU()]
            c = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, 10, bias=False))


def torch_step_fn(kind, x_np, y_np, dtype="float32"):
    """A closure running PyTorch's equivalent full-batch SGD step (TF32 off), or None.

    Cross-entropy (sum) for the classifiers; the logistic loss (sum) for the MLP with
    labels in {-1, +1}."""
    try:
        import torch
    except ImportError:
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdt = torch.float32 if dtype == "float32" else torch.float64
    net = torch_net(kind, int(np.prod(x_np.shape[1:]))).to(dev, tdt)
    xs = np.moveaxis(x_np, -1, 1) if x_np.ndim == 4 else x_np
    x = torch.tensor(xs, dtype=tdt, device=dev)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    if kind == "mlp":
        y = torch.tensor(y_np, dtype=tdt, device=dev)

        def loss_fn(out):
            return torch.nn.functional.softplus(-y * out[:, 0]).sum()
    else:
        y = torch.tensor(y_np, dtype=torch.long, device=dev)
        ce = torch.nn.CrossEntropyLoss(reduction="sum")

        def loss_fn(out):
            return ce(out, y)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x)).backward()
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()

    return step


def torch_step(kind, x_np, y_np, reps, dtype="float32"):
    """Median time of PyTorch's equivalent step, or None without torch."""
    step = torch_step_fn(kind, x_np, y_np, dtype)
    if step is None:
        return None
    step()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))
