"""Multi-process start-up: one process per host (or per GPU), joined through jax.distributed.

On CPU, collectives between processes go through gloo, so the multi-host path is testable on one machine.
"""
from __future__ import annotations

import os

import jax
from absl import flags


def define_flags() -> None:
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs.")
    flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator_address:
        return  # single process
    num_processes = num_processes if num_processes is not None else int(os.environ["JAX_NUM_PROCESSES"])
    process_id = process_id if process_id is not None else int(os.environ["JAX_PROCESS_ID"])
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def initialize_from_flags() -> None:
    f = flags.FLAGS
    initialize(f.coordinator_address, f.num_processes, f.process_id)
