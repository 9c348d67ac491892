"""Shared behaviour of the command-line entry points: user errors are one line, not a traceback."""
from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Callable, TypeVar

from traces.errors import UserError

T = TypeVar("T")


WIDE = 200  # columns of a report printed to a file or a pipe (rich would cut its tables at 80)


def console():
    """A rich Console for a command's report: the terminal's width, or WIDE when the output is not a
    terminal, so that tables redirected to a file or read by a test keep their full rows."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=WIDE)


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


def parse_key_values(argv: list[str], config_type: type[T], usage: str) -> T:
    """`key=value` arguments, as Hydra writes them, into a config dataclass.

    Values are converted to the field's type; `null` gives None where the field allows it.
    -h/--help prints `usage` and exits.
    """
    hints = typing.get_type_hints(config_type)
    known = {f.name: f for f in dataclasses.fields(config_type)}
    values: dict[str, object] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        key, sep, raw = arg.partition("=")
        if not sep:
            raise UserError(f"argument '{arg}' is not key=value; run with --help for the keys")
        if key not in known:
            raise UserError(f"unknown key '{key}'; known keys: {', '.join(known)}")
        values[key] = _convert(key, raw, hints[key])
    missing = [name for name, f in known.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"missing {', '.join(f'{name}=...' for name in missing)}; run with --help for the keys")
    return config_type(**values)


def _convert(key: str, raw: str, hint: object) -> object:
    choices = typing.get_args(hint)
    optional = type(None) in choices
    base = next((c for c in choices if c is not type(None)), hint) if optional else hint
    if optional and raw.lower() in ("null", "none", "~"):
        return None
    try:
        if base is bool:
            if raw.lower() not in _BOOLEANS:
                raise ValueError
            return _BOOLEANS[raw.lower()]
        return base(raw)  # type: ignore[operator]
    except ValueError:
        kind = getattr(base, "__name__", str(base))
        raise UserError(f"{key}={raw}: expected {'a boolean (true/false)' if base is bool else 'a ' + kind}") from None


_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
