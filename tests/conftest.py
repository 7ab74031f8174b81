"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _expected_seconds(item) -> float:
    """A slow test's `@pytest.mark.slow(seconds=...)`, else 1 for slow tests, 0 for the rest."""
    marker = item.get_closest_marker("slow")
    return 0.0 if marker is None else float(marker.kwargs.get("seconds", 1))


def pytest_collection_modifyitems(config, items):
    """Longest tests first, so that with a worker per core none of them starts last on one
    worker while the others sit idle (the order of the rest is kept)."""
    items.sort(key=lambda item: -_expected_seconds(item))
