"""Errors that name a problem in the user's input and how to fix it.

Command-line entry points print a UserError as one line and exit non-zero;
anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user (config, file, argument): one line, problem and fix."""


class TraceError(UserError):
    """A trace directory is missing, truncated, or inconsistent."""
