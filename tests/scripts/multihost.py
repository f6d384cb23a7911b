"""One process of tests/test_multihost.py: join a 2-process jax.distributed run on
localhost (CPU, gloo), shard the data over both processes' devices, and print the
sharded log-loss and gradient (flattened) as JSON."""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from gflow.distributed import initialize  # noqa: E402


def main():
    port, pid = sys.argv[1], int(sys.argv[2])
    initialize(f"localhost:{port}", 2, pid)
    from tests.scripts.problems import multihost_problem

    obj, p = multihost_problem(devices=jax.devices())
    assert jax.process_count() == 2 and len(obj.x.sharding.device_set) == jax.device_count()
    assert not obj.x.is_fully_addressable  # really split across the processes
    ell, g = jax.jit(lambda o, p: o.value_and_grad(p))(obj, p)
    local = [np.asarray(a.addressable_data(0)) for a in jax.tree.leaves((ell, g))]
    ell_h, g_h = jax.tree.unflatten(jax.tree.structure((ell, g)), local)
    flat = np.asarray(ravel_pytree(g_h)[0])
    json.dump({"process": pid, "log_loss": float(ell_h), "grad": flat.tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
