"""Simulated CPU devices: how a laptop, a CI runner or a notebook gets a real multi-device mesh.

JAX fixes the CPU backend's device count when it first starts a backend (the first array, the
first `jax.devices()`), so the count must be set before that: `simulate_cpu_devices(n)` sets
`jax_num_cpu_devices` while it still can, and afterwards says clearly whether the running
backend has enough. An explicit `--xla_force_host_platform_device_count` in XLA_FLAGS wins
(`tests/conftest.py` uses it). Only the CPU platform is affected: on a GPU machine the mesh is
built over the GPUs.
"""

from __future__ import annotations

import os
import re

import jax

from gigajax.errors import ConfigError, GigajaxError

_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def without_device_count(xla_flags: str) -> str:
    """`xla_flags` less the simulated-device count, for a child process that picks its own
    (the other flags kept)."""
    return " ".join(flag for flag in xla_flags.split() if not _FLAG.fullmatch(flag))


def _flagged_count() -> int | None:
    match = _FLAG.search(os.environ.get("XLA_FLAGS", ""))
    return int(match.group(1)) if match else None


def simulate_cpu_devices(n: int) -> int:
    """Give JAX's CPU backend at least `n` devices; returns how many it will have.

    Call it first in a fresh process or kernel. Once JAX has started, it checks the running
    backend instead and raises GigajaxError, saying what to do, when it has fewer than `n`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"simulate_cpu_devices({n!r}): give a device count >= 1.")
    flagged = _flagged_count()
    if flagged is not None:
        if flagged < n:
            raise GigajaxError(f"XLA_FLAGS sets --xla_force_host_platform_device_count="
                               f"{flagged}, fewer than the {n} devices wanted: raise it, or "
                               "unset it and let gigajax choose.")
        return flagged
    try:
        current = jax.config.jax_num_cpu_devices
        wanted = max(n, current if current and current > 0 else 1)
        jax.config.update("jax_num_cpu_devices", wanted)
        return wanted
    except RuntimeError:  # the backends are running: the count is what it is
        have = len(jax.devices("cpu"))
        if have >= n:
            return have
        raise GigajaxError(
            f"JAX has already started with {have} CPU device(s) and {n} are wanted: the CPU "
            "device count is fixed when JAX first runs something. Restart the kernel (or "
            f"process) and call gigajax.simulate_cpu_devices({n}) before anything else uses "
            "JAX, or set XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{n} before starting Python.") from None


def ensure_devices(n: int | None) -> None:
    """Make `n` devices available for a mesh: simulated CPU devices unless JAX already runs on
    an accelerator (whose devices the mesh then uses); None or 1 asks for nothing."""
    if not n or n <= 1:
        return
    try:
        simulate_cpu_devices(n)
    except GigajaxError:
        if jax.default_backend() == "cpu":
            raise
