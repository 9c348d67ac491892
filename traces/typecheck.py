"""Checking a setting's value against its annotated type, with a one-line error naming the key.

Hydra (and YAML) parse `seed=abc` as a string and `warm_start=0` as an integer: nothing in the
composed config says what a setting must be. The dataclasses and the policies' __init__ signatures
do; check_value() holds a value to that, so a bad setting fails before a run, in one line.
"""
from __future__ import annotations

import types
import typing
from typing import Any

from traces.errors import UserError

_NAMES = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string",
          dict: "a mapping", list: "a list", tuple: "a list"}


def allowed(hint: Any) -> str:
    """What a value of this type may be, in words: 'an integer or null'."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    words = ["null" if t is type(None) else _word(t) for t in options]
    return " or ".join(dict.fromkeys(words))


def _word(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return _NAMES.get(typing.get_origin(hint) or hint, str(hint))


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any or hint is typing.Any:
        return True
    if _is_union(hint):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint) or hint
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(origin, type):
        return isinstance(value, origin)
    return True  # a type this check does not know: left to the code that uses it


def check_value(key: str, value: Any, hint: Any, where: str = "") -> Any:
    """value, if it is of type hint (an int counts as a float; a bool is not an int); else a UserError
    'KEY=VALUE: expected ...'. Floats become float, so 1 and 1.0 are one setting."""
    if not _matches(value, hint):
        options = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        expected = f"one of {', '.join(map(str, options))}" if options else allowed(hint)
        raise UserError(f"{where}{key}={value}: expected {expected}")
    float_only = hint is float or (_is_union(hint) and float in typing.get_args(hint)
                                   and int not in typing.get_args(hint))
    if float_only and isinstance(value, int):
        return float(value)
    return value
