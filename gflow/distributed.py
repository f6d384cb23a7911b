"""Several hosts: ``jax.distributed`` and which process writes.

Every process runs the same program on the same data files; ``shard`` (in
``gflow.objective``) lays the samples out over the devices of all processes, and XLA's
collectives do the rest. Process 0 writes the run folder; the others compute only.
On CPUs the collectives go through gloo.
"""

from __future__ import annotations

import os
import sys
import threading

import jax
import numpy as np

from gflow.errors import summarize

__all__ = ["initialize", "is_writer", "local", "parse_address", "to_host"]


def parse_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of a ``HOST:PORT`` coordinator address; ``ValueError`` otherwise."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"coordinator address {address!r}: expected HOST:PORT, port 1..65535")
    return host, int(port)


def initialize(coordinator: str, num_processes: int, process_id: int, timeout: int = 120) -> None:
    """Join a ``jax.distributed`` run (call before anything touches a device); a
    ``ValueError`` when the other processes are not all there within ``timeout`` seconds
    (an unreachable coordinator would otherwise wait for jax's five minutes, or hang)."""
    host, port = parse_address(coordinator)
    # XLA aborts the whole process (a C++ stack trace) when it cannot connect: find out
    # first, from Python, whether the coordinator can be reached (or its port bound)
    if process_id == 0:
        _check_bindable(port, coordinator)
    else:
        _wait_reachable(host, port, timeout, coordinator)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Reachable is not joined: when a peer never comes, XLA aborts the process after its
    # own timeout (a C++ stack trace, no Python exception). A watchdog that fires first
    # says so in one line and exits 2; XLA's timeout is set past it.
    watchdog = threading.Timer(float(timeout), _give_up, args=(
        f"gflow: error: the multi-host run at {coordinator} did not start within {timeout:g} s:"
        f" not all {num_processes} processes joined (this is process {process_id}); start"
        " every process with the same --coordinator and --num-processes",))  # fmt: skip
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes,
            process_id=process_id, initialization_timeout=int(timeout) + 60,
        )  # fmt: skip
    except Exception as e:  # jax raises XlaRuntimeError / RuntimeError with long texts
        raise ValueError(
            f"could not join the multi-host run at {coordinator} as process {process_id} of "
            f"{num_processes} within {timeout} s ({summarize(e)})"
        ) from None
    finally:
        watchdog.cancel()


def _give_up(message: str) -> None:
    """Exit 2 with ``message`` as the one line on stderr, from the watchdog thread (the main
    thread is inside XLA, where no Python exception reaches it)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(2)


def _check_bindable(port: int, coordinator: str) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as e:
            raise ValueError(
                f"coordinator {coordinator}: process 0 cannot listen on port {port} "
                f"({e.strerror}); choose another port"
            ) from None


def _wait_reachable(host: str, port: int, timeout: float, coordinator: str) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"coordinator {coordinator} not reachable within {timeout:g} s "
                    f"({e.strerror or e}): is process 0 running there?"
                ) from None
            time.sleep(0.2)


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
