"""What every command shares: `--config.a.b=v` overrides after the known flags, and the rule
that unknown arguments are usage errors."""

from __future__ import annotations

from gigajax.errors import GigajaxError


def split_overrides(rest: list[str]) -> list[str]:
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


def no_extra(rest: list[str], command: str) -> None:
    """A command without config overrides takes no further arguments."""
    if rest:
        raise GigajaxError(f"unknown argument(s) {' '.join(rest)}: see `gigajax {command} "
                           "--help`.")
