"""Shared by the tests that start subprocesses."""

import os

from gigajax.parallel.devices import without_device_count


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without the simulated-device count in XLA_FLAGS (the CLI or script
    under test chooses its own), keeping the other XLA flags and the compilation cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = without_device_count(env.get("XLA_FLAGS", ""))
    env.update(extra)
    return env
