"""Errors the runner reports to users as one line (the CLI prints the message, no traceback)."""


class RunnerError(Exception):
    """Base class: a problem in the user's input or setup, reported without a traceback."""


class ParameterError(RunnerError, ValueError):
    """An unknown parameter, a value of the wrong type, or a malformed `parameters` cell."""


class GridError(RunnerError, ValueError):
    """A malformed GRID.yaml."""
