"""The small checks every validation rule is built from: each raises ConfigError."""

from __future__ import annotations

from launcher.errors import ConfigError


def require(ok: bool, message: str) -> None:
    """ConfigError(`message`) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def one_of(key: str, value: object, allowed: tuple[object, ...]) -> None:
    names = ", ".join(str(a) for a in allowed)
    require(value in allowed, f"{key}={value!r} is not valid; use one of: {names}.")


def positive(key: str, value: float) -> None:
    require(value > 0, f"{key}={value} must be positive.")


def at_least(key: str, value: float, low: float) -> None:
    require(value >= low, f"{key}={value} must be at least {low}.")
