"""Shared by the tests that start subprocesses."""

import os


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without the simulated-device count in XLA_FLAGS (the CLI or script
    under test chooses its own), keeping the other XLA flags and the compilation cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in flag)
    env.update(extra)
    return env
