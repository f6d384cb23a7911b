"""Several hosts: ``jax.distributed`` and which process writes.

Every process runs the same program on the same data files; ``shard`` (in
``gflow.objective``) lays the samples out over the devices of all processes, and XLA's
collectives do the rest. Process 0 writes the run folder; the others compute only.
On CPUs the collectives go through gloo.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["initialize", "is_writer", "local", "to_host"]


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join a ``jax.distributed`` run (call before anything touches a device)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


def is_writer() -> bool:
    """Whether this process writes files: process 0 of a multi-host run, or the only one."""
    return jax.process_index() == 0


def to_host(a) -> np.ndarray:
    """A global array's whole value on this host (gathered from every process if need be)."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)


def local(objective):
    """``objective`` with its data gathered onto this process (for host-side work such as
    the KKT residual's Gram matrix in a multi-host run); unchanged when already local."""
    if objective.x.is_fully_addressable:
        return objective
    import equinox as eqx

    x, y = to_host(objective.x), to_host(objective.y)
    arrays = (jax.numpy.asarray(x), jax.numpy.asarray(y))
    return eqx.tree_at(lambda o: (o.x, o.y), objective, arrays)
