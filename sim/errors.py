"""Errors of the simulator's inputs and of policies that break the interface's contract."""
from traces.errors import UserError


class ConfigError(UserError):
    """A setting is malformed or out of range."""


class PolicyError(RuntimeError):
    """A policy broke the contract (evicted what it may not, freed too little): a bug in the policy."""


class StallError(RuntimeError):
    """A replay stopped before serving every request: a bug in an engine or a policy, not a setting."""
