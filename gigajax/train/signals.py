"""Stopping a run between steps: SIGTERM (preemption, `kill`) saves after the step in flight.

One process: a handler sets a flag that the loop reads after each step (raising from the handler
could land inside a step, whose donated input state is already gone). Several processes: the
signal reaches each at a different step and a save is a collective, so JAX's preemption service
catches SIGTERM and `reached_preemption_sync_point` turns True on every process at the same step.
The previous handler is put back when the run ends, so a notebook can train again.
"""

from __future__ import annotations

import signal
import threading

from jax.experimental import multihost_utils


class Preempted(KeyboardInterrupt):
    """SIGTERM: the run saved a checkpoint after a whole step and stops (exit code 130)."""


class SigtermStop:
    """When to stop on SIGTERM: after a whole step, never inside one (module docstring)."""

    def __init__(self, multi_process: bool):
        self.multi_process = multi_process
        self.flag = threading.Event()
        self.previous = None
        if not multi_process and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.flag.set())

    def reached(self, step: int) -> bool:
        """Call after every step, on every process: True where all of them stop."""
        if self.multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag.is_set()

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
