"""Shared behaviour of the command-line entry points: user errors are one line, not a traceback."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from traces.errors import UserError

T = TypeVar("T")


def run_cli(work: Callable[[], T]) -> T:
    """Run a command; a UserError prints 'error: ...' on stderr and exits with status 2."""
    try:
        return work()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
