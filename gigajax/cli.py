"""`gigajax` command line: `gigajax train --config FILE --workdir DIR [--config.a.b=v ...]`.

User errors (`GigajaxError`) are printed as one paragraph without a traceback, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from gigajax.errors import GigajaxError


def _split_overrides(rest: list[str]) -> list[str]:
    """Accept `--config.a.b=v` and `--config.a.b v`; anything else is a usage error."""
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            raise GigajaxError(f"Unknown argument {item!r}: overrides look like "
                               "--config.train.steps=100.")
        if "=" not in item:
            if i + 1 >= len(rest):
                raise GigajaxError(f"Override {item!r} has no value: write {item}=VALUE.")
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    return overrides


def _simulate_cpu_devices(mesh_cfg) -> None:
    """Give the CPU backend as many (simulated) devices as the mesh asks for.

    Only the CPU platform is affected; on a GPU machine the mesh is built over the GPUs. An
    explicit `--xla_force_host_platform_device_count` in XLA_FLAGS wins.
    """
    import jax

    from gigajax.mesh import fixed_device_count

    wanted = fixed_device_count(mesh_cfg)
    if wanted and wanted > 1 and "xla_force_host_platform_device_count" not in os.environ.get(
            "XLA_FLAGS", ""):
        try:
            jax.config.update("jax_num_cpu_devices", wanted)
        except RuntimeError:  # backends already initialised (e.g. called from a notebook)
            pass


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from gigajax.config import load_config

    cfg = load_config(args.config, overrides)
    _simulate_cpu_devices(cfg.mesh)
    from gigajax.train.loop import train

    summary = train(cfg, args.workdir, progress=not args.no_progress)
    if "loss" not in summary:
        print(f"nothing to do: {args.workdir} is already at step {summary['step']}; raise "
              "--config.train.steps to train further")
        return 0
    keys = ("step", "loss", "eval_loss", "tokens_per_s", "mfu")
    print("final: " + "  ".join(f"{k} {summary[k]:.6g}" for k in keys if k in summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gigajax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train or resume a model",
                                description="Train per a config file; rerun to resume.")
    train.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
    train.add_argument("--workdir", required=True, help="where metrics and checkpoints go")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = parser.parse_known_args(argv)
    try:
        return _train(args, _split_overrides(rest))
    except GigajaxError as error:
        print(f"gigajax: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gigajax: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
