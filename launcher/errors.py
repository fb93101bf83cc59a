"""The launcher's user error, and how the command line reports one."""

from __future__ import annotations

import sys
from typing import NoReturn


class ConfigError(ValueError):
    """A user error in the composed configuration: the message names the key and the fix."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `moelab-launch: error: <message>` and exit with `code`."""
    print(f"moelab-launch: error: {message}", file=sys.stderr)
    raise SystemExit(code)
