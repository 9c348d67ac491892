"""Policies by name: @register("name") in the policy's own module; make_policy() builds one.

Every module of this package is imported on first use, so a new policy is one new file.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from policies.base import Policy
from traces.errors import UserError
from traces.typecheck import check_value

P = TypeVar("P", bound=type[Policy])
_REGISTRY: dict[str, type[Policy]] = {}
_loaded = False


def register(name: str) -> Callable[[P], P]:
    def decorate(cls: P) -> P:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"two policies registered as '{name}': {_REGISTRY[name].__module__} and {cls.__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


@contextmanager
def scoped() -> Iterator[None]:
    """Policies registered inside the block are forgotten after it (an example run in-process)."""
    _load_all()
    saved = dict(_REGISTRY)
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    import policies

    for module in pkgutil.iter_modules(policies.__path__):
        importlib.import_module(f"policies.{module.name}")
    _loaded = True


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def shipped() -> list[str]:
    """The registered policies but a test's own (named test_*, registered for its module only):
    what "every policy" means to a command."""
    return [name for name in available() if not name.startswith("test_")]


def policy_class(name: str) -> type[Policy]:
    _load_all()
    if name not in _REGISTRY:
        raise UserError(f"unknown policy '{name}'; known policies: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def knob_types(cls: type[Policy]) -> dict[str, Any]:
    """Each knob's type: its annotation in __init__, else its default's type (None: unchecked)."""
    hints = typing.get_type_hints(cls.__init__)
    types = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in hints:
            types[name] = hints[name]
        elif param.default is not inspect.Parameter.empty and param.default is not None:
            types[name] = type(param.default)
    types.pop("return", None)
    return types


def knob_names(cls: type[Policy]) -> list[str]:
    """The knobs a policy takes: its __init__'s parameters."""
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def make_policy(name: str, **params: Any) -> Policy:
    cls = policy_class(name)
    accepted = knob_names(cls)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise UserError(f"policy '{name}' has no parameter {', '.join(unknown)}; "
                        f"its parameters: {', '.join(accepted) or 'none'}")
    hints = knob_types(cls)
    params = {k: check_value(f"policy.{k}", v, hints[k], where=f"policy '{name}': ") if k in hints else v
              for k, v in params.items()}
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise UserError(f"policy '{name}': {exc}") from None
