"""One error type for every bad input, so the CLI and both UIs can show it without a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing input error: names the argument, what was given and what is allowed.

    The CLI prints ``str(error)`` and exits 2; the UIs show it with gr.Error / st.error.
    """

    def __init__(self, argument: str, given: object, allowed: str):
        self.argument = argument
        self.given = given
        self.allowed = allowed
        super().__init__(f"{argument}: got {given!r}; allowed: {allowed}")


def int_range_text(low: int, high: int, extra: tuple[int, ...] = ()) -> str:
    """What `check_int_range` allows, in the words of its message."""
    return f"an integer from {low} to {high}" + (f", or {', '.join(map(str, extra))}" if extra else "")


def check_int_range(argument: str, value, low: int, high: int, extra: tuple[int, ...] = ()) -> int:
    """Return ``value`` as int if it lies in [low, high] (or in ``extra``), else raise ConfigError."""
    allowed = int_range_text(low, high, extra)
    try:
        as_int = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(argument, value, allowed) from None
    if isinstance(value, bool) or (isinstance(value, float) and value != as_int):  # 2.5 is not a bit-width
        raise ConfigError(argument, value, allowed)
    if not (low <= as_int <= high or as_int in extra):
        raise ConfigError(argument, value, allowed)
    return as_int


def check_float_range(argument: str, value, low: float, high: float) -> float:
    """Return ``value`` as float if it lies in [low, high], else raise ConfigError."""
    allowed = f"a number from {low:g} to {high:g}"
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ConfigError(argument, value, allowed) from None
    if not (low <= as_float <= high):  # also rejects NaN
        raise ConfigError(argument, value, allowed)
    return as_float


class Busy(RuntimeError):
    """The server cannot take this run now (every slot of its kind is taken); the message says what to do."""


class Cancelled(RuntimeError):
    """A run was stopped by its visitor (raised from a progress callback between steps)."""
