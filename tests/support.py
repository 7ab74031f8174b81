"""Shared by the tests: the XLA flags that make compiling cheap, and the environment of the
tests that start subprocesses. Imports no JAX (conftest.py reads it before JAX starts)."""

import os

# XLA:CPU code generation for programs compiled more often than they run (most of the suite;
# the HLO is the same, only its translation to machine code differs): LLVM without its
# optimisation passes, and the older loop emitters for fusions in place of the MLIR-based
# fusion emitters. docs/testing.md has what each saves.
CHEAP_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def flag_name(flag: str) -> str:
    """`--xla_name=value` -> `--xla_name`."""
    return flag.split("=", 1)[0]


def without_cheap_compile_flags(xla_flags: str) -> str:
    """`xla_flags` less CHEAP_COMPILE_FLAGS: for programs that run for long enough to pay for
    XLA's default code generation (the notebooks that train)."""
    names = {flag_name(f) for f in CHEAP_COMPILE_FLAGS}
    return " ".join(f for f in xla_flags.split() if flag_name(f) not in names)


def subprocess_env(cheap_compile: bool = True, **extra: str) -> dict[str, str]:
    """This environment without the simulated-device count in XLA_FLAGS (the CLI or script
    under test chooses its own), keeping the compilation cache and the other XLA flags; with
    `cheap_compile=False` also without CHEAP_COMPILE_FLAGS, for a subprocess that trains for
    long enough to pay for XLA's default code generation."""
    from gigajax.parallel.devices import without_device_count

    env = dict(os.environ)
    env["XLA_FLAGS"] = without_device_count(env.get("XLA_FLAGS", ""))
    if not cheap_compile:
        env["XLA_FLAGS"] = without_cheap_compile_flags(env["XLA_FLAGS"])
    env.update(extra)
    return env


# A 2-layer d_model 64 model on 64-token windows: what the tests that train through the CLI or
# `train()` start from (each adds its own steps, logging and checkpoint overrides).
TINY_MODEL = ["--config.model.d_model=64", "--config.model.mlp_dim=128",
              "--config.model.n_layers=2", "--config.data.seq_len=64",
              "--config.data.batch_size=8", "--config.attention.block_q=32",
              "--config.attention.block_kv=32", "--config.mesh.data=-1"]
