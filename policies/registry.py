"""Policies by name: @register("name") in the policy's own module; make_policy() builds one.

Every module of this package is imported on first use, so a new policy is one new file.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable, TypeVar

from policies.base import Policy
from traces.errors import UserError

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


def policy_class(name: str) -> type[Policy]:
    _load_all()
    if name not in _REGISTRY:
        raise UserError(f"unknown policy '{name}'; known policies: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_policy(name: str, **params: Any) -> Policy:
    cls = policy_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise UserError(f"policy '{name}' has no parameter {', '.join(unknown)}; "
                        f"its parameters: {', '.join(accepted) or 'none'}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise UserError(f"policy '{name}': {exc}") from None
