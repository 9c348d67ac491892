"""Shared behaviour of the command-line entry points: user errors are one line, not a traceback.

`python -m sim` (and `python -m realrun`, which composes the same conf/ groups) read Hydra overrides;
every other command is argparse through ArgumentParser here, whose refusals are run_cli's one line."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Callable, Generic, NoReturn, TypeVar

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


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every command but the Hydra ones (`python -m sim`, `python -m realrun`) uses it, with the project's form of a refusal: one
    line, 'error: ...', status 2 (run_cli's form), instead of argparse's usage block and its error."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # a misspelt flag is refused, not read as another one
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (--help lists the arguments)", file=sys.stderr)
        raise SystemExit(2)


class ConfigParser(ArgumentParser, Generic[T]):
    """The parser of a config dataclass's fields: those without a default are positional arguments, in
    the dataclass's order; the others are --flags (dashes for underscores) whose defaults are the
    dataclass's own, so that no default is written twice. A boolean is --name / --no-name."""

    def __init__(self, config_type: type[T], prog: str, description: str | None) -> None:
        super().__init__(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.config_type = config_type
        hints = typing.get_type_hints(config_type)
        for field in dataclasses.fields(config_type):
            kind = _base_type(hints[field.name])
            factory = field.default_factory
            default = field.default if factory is dataclasses.MISSING else factory()
            if default is dataclasses.MISSING:
                self.add_argument(field.name, type=kind, metavar=field.name.upper())
            elif kind is bool:
                self.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction, default=default)
            else:
                self.add_argument(_flag(field.name), type=kind, default=default, metavar=field.name.upper(),
                                  help=f"default: {default}")

    def parse_config(self, argv: list[str] | None = None) -> T:
        """The config of a command line (sys.argv's without argv); the dataclass's checks raise UserError."""
        return self.config_type(**vars(self.parse_args(argv)))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(hint: object) -> type:
    """int of `int | None`: the type a value given on the command line converts to."""
    choices = [c for c in typing.get_args(hint) if c is not type(None)]
    return choices[0] if choices else hint  # type: ignore[return-value]
