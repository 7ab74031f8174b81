"""Multi-process runs: start `jax.distributed`, and give each process only its rows of a batch.

One process per GPU under SLURM (JAX's detection gives task i of a node that node's GPU i), one
per host or per GPU elsewhere; all processes run the same program on one global mesh. Each
process reads only the batch rows its own devices hold and `jax.make_array_from_process_local_data`
joins them into one global array. Process 0 alone writes logs; every process takes part in
checkpoint saves (Orbax writes each process's shards); on SIGTERM, JAX's preemption service lets
them agree on the step to save (`train/loop.py`).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gigajax.errors import ConfigError
from gigajax.parallel.mesh import BATCH_AXES, SEQUENCE_AXES

# [B, T]: rows over data x fsdp x expert, tokens (in the sequence layout's order) over ring x
# Ulysses
BATCH_SPEC = PartitionSpec(BATCH_AXES, SEQUENCE_AXES)


def cluster_detected() -> bool:
    """True under a multi-task SLURM step or Open MPI, where JAX finds its peers on its own."""
    slurm = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    return slurm or "OMPI_MCA_orte_hnp_uri" in os.environ


def expected_process_count(num_processes: int | None = None) -> int:
    """Processes in this run, known before JAX starts: the flag, else the launcher's count."""
    if num_processes:
        return num_processes
    if cluster_detected():
        return int(os.environ.get("SLURM_NTASKS") or os.environ.get("OMPI_COMM_WORLD_SIZE", 1))
    return 1


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the other processes: explicit coordinator flags win, else a detected cluster."""
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError("--coordinator, --num-processes and --process-id go together: "
                              f"got {coordinator!r}, {num_processes!r}, {process_id!r}.")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id={process_id} must lie in [0, --num-processes="
                              f"{num_processes}).")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
    elif cluster_detected():
        jax.distributed.initialize()


def is_main_process() -> bool:
    return jax.process_index() == 0


@functools.lru_cache  # place_batch asks every step
def process_rows(mesh: Mesh, batch_size: int) -> slice:
    """The contiguous rows of a [batch_size, ...] batch that this process's devices hold."""
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_SPEC[0]))
    rows = {index[0].indices(batch_size)[:2]
            for index in sharding.addressable_devices_indices_map((batch_size,)).values()}
    start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
    if sum(b - a for a, b in rows) != stop - start:
        raise ConfigError(f"this process's devices hold rows {sorted(rows)} of the batch, which "
                          "are not contiguous; order the mesh so each host's devices sit together "
                          "on the data axes.")
    return slice(start, stop)


def place_batch(local: dict[str, np.ndarray], mesh: Mesh, batch_size: int
                ) -> dict[str, jax.Array]:
    """Global [batch_size, T] arrays from this process's rows (`process_rows`), whole rows.

    Each device takes its block (rows and, under sequence parallelism, tokens) from the rows
    this process read, so the sequence axis may also span processes.
    """
    sharding = NamedSharding(mesh, BATCH_SPEC)
    first_row = process_rows(mesh, batch_size).start

    def place(value: np.ndarray) -> jax.Array:
        def block(index: tuple[slice, ...]) -> np.ndarray:  # global index -> this process's rows
            rows = range(batch_size)[index[0]]
            return value[(slice(rows.start - first_row, rows.stop - first_row), *index[1:])]

        return jax.make_array_from_callback((batch_size, *value.shape[1:]), sharding, block)

    return {key: place(value) for key, value in local.items()}
