"""Multi-host start-up: join JAX's multi-controller runtime when launched as several processes.

Sources, first match wins: explicit arguments (the launcher's --coordinator_address /
--num_processes / --process_id flags); the variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID; a cluster jax detects by itself (TPU pod slices, SLURM with several tasks, Open
MPI, ...), which `jax.distributed.initialize()` with no arguments handles. A single plain process
initialises nothing.
"""

from __future__ import annotations

import os

import jax
from absl import logging

_AUTO_DETECTED = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                  "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Calls jax.distributed.initialize when this is one of several processes; True if it did."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    explicit = coordinator_address is not None and (num_processes or 1) > 1
    auto = any(int(os.environ.get(v, "1") or 1) > 1 if v.endswith(("NTASKS", "SIZE")) else v in
               os.environ for v in _AUTO_DETECTED)
    if not explicit and not auto:
        return False
    # CPU devices of several processes talk through gloo (tests, CPU clusters); GPU and TPU
    # backends ignore this. (Asking for the backend here would start it too early.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
