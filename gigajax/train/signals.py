"""Stopping a run between steps: SIGTERM (preemption, `kill`) saves after the step in flight.

One process: a handler sets a flag that the loop reads after each step (raising from the handler
could land inside a step, whose donated input state is already gone). Several processes: the
signal reaches each at a different step and a save is a collective, so JAX's preemption service
catches SIGTERM and `reached_preemption_sync_point` turns True on every process at the same step.
The previous handler is put back when the run ends, so a notebook can train again.

Start-up: the CLI calls `install_early()` before it imports JAX (seconds of imports, device
set-up and compiles in which SIGTERM would otherwise kill the process with nothing said). The
early handler only records the signal; the run's `SigtermStop` takes it over and stops before
its first step, and a command that is not a run exits at once (`release_early`). This module
imports JAX only when a multi-process run asks it for the sync point.
"""

from __future__ import annotations

import signal
import threading

_early_sigterm = threading.Event()  # set by the early handler; taken over by SigtermStop
_early_installed = False


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install_early() -> None:
    """Record SIGTERM from now on instead of dying of it (call first thing in the CLI)."""
    global _early_installed
    if _is_main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: _early_sigterm.set())
        _early_installed = True


def release_early() -> bool:
    """Put SIGTERM's default action back; True if one arrived while the early handler held it."""
    global _early_installed
    if _early_installed and _is_main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _early_installed = False
    return _early_sigterm.is_set()


class Preempted(KeyboardInterrupt):
    """SIGTERM: the run saved a checkpoint after a whole step and stops (exit code 130)."""


class SigtermStop:
    """When to stop on SIGTERM: after a whole step, never inside one (module docstring)."""

    def __init__(self, multi_process: bool):
        self.multi_process = multi_process
        self.flag = threading.Event()
        if _early_sigterm.is_set():  # arrived during start-up
            self.flag.set()
            _early_sigterm.clear()
        self.previous = None
        if not multi_process and _is_main_thread():
            self.previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.flag.set())

    def before_start(self) -> bool:
        """True when SIGTERM came before the first step (nothing new to save). With several
        processes each stops on its own here: a launcher signals all of them."""
        return self.flag.is_set()

    def reached(self, step: int) -> bool:
        """Call after every step, on every process: True where all of them stop."""
        if self.multi_process:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag.is_set()

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
