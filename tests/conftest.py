"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere, and compiling made
cheap: one JAX compilation cache for the whole run, and XLA's cheap CPU code generation; huge
pages for malloc's large blocks (below).

Compiling is most of the suite's time (one test file: 4 min 47 s cold, 65 s with every program
already compiled), and the tests' programs are tiny, so XLA's CPU backend generates code the
cheap way (`support.CHEAP_COMPILE_FLAGS`: LLVM at -O0 and the older fusion emitters;
docs/testing.md has what each saves). The HLO is the same and every comparison
is between programs compiled alike; what users run is compiled the default way (the PassKey
training test and the notebooks that train drop these flags).

The cache: the suite compiles the same programs many times over (the tiny config's one-device
reference in every equivalence test, the same train step in every CLI subprocess and notebook),
so the first compile of each is kept on disk and reused by every worker and subprocess of this
run (they inherit the environment). It starts empty in a new temporary directory each run, is
removed at the end, and changes no result: an executable read back is the one XLA compiled.
"""

import os
import shutil
import tempfile

from support import CHEAP_COMPILE_FLAGS, flag_name

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
for cheap in CHEAP_COMPILE_FLAGS:  # unless XLA_FLAGS already sets that flag
    if flag_name(cheap) not in flags:
        flags += " " + cheap
os.environ["XLA_FLAGS"] = flags.strip()
# Transparent huge pages for glibc malloc's large blocks, in every worker and subprocess: XLA:CPU
# frees and reallocates its big buffers each step, and faulting them in 4 KiB pages cost the
# PassKey training a quarter of its time (docs/testing.md). Results are bitwise the same.
tunables = os.environ.get("GLIBC_TUNABLES", "")
if "glibc.malloc.hugetlb" not in tunables:
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller; workers inherit it
    _CACHE = tempfile.mkdtemp(prefix="gigajax-test-jit-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    # every program, however quick to compile: a CLI subprocess that saves a checkpoint compiles
    # some 70 small slices of 40 ms each (Orbax's replica-parallel writes), again in each one
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
else:
    _CACHE = None

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _expected_seconds(item) -> float:
    """A slow test's `@pytest.mark.slow(seconds=...)`, else 1 for slow tests, 0 for the rest."""
    marker = item.get_closest_marker("slow")
    return 0.0 if marker is None else float(marker.kwargs.get("seconds", 1))


def pytest_collection_modifyitems(config, items):
    """Modules with the longest tests first, so that with a worker per core none of them starts
    last on one worker while the others sit idle; each module's tests stay together (its slow
    ones first), since a module-scoped fixture is built again whenever a worker comes back to a
    module it has left (test_dpo.py's training run was built up to four times). The order of
    the rest is kept."""
    module_seconds: dict[str, float] = {}
    module_index: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        module_index.setdefault(module, len(module_index))
        module_seconds[module] = max(module_seconds.get(module, 0.0), _expected_seconds(item))

    def key(item) -> tuple[float, int, float]:
        module = item.nodeid.split("::")[0]
        return -module_seconds[module], module_index[module], -_expected_seconds(item)

    items.sort(key=key)


def pytest_unconfigure(config):
    """The run's compilation cache goes with it (only the process that made it removes it)."""
    if _CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_CACHE, ignore_errors=True)
