"""One error type for every bad input, so the CLI and both UIs can show it without a traceback."""

from __future__ import annotations

import argparse
import math


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


def integer(allowed: str | None = None, low: int | None = None, high: int | None = None):
    """An argparse type: an integer (written as one) within [low, high] when they are given, else a
    one-line error that says what is allowed (`allowed`, or the range in words)."""
    if allowed is None:
        allowed = int_range_text(low, high) if high is not None else f"an integer ≥ {low}" if low is not None else "an integer"

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:  # "3.5", "four", "", a number of more than 4300 digits
            raise argparse.ArgumentTypeError(f"got {text[:80]!r}; allowed: {allowed}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"got {text[:80]!r}; allowed: {allowed}")
        return value

    return parse


def number(allowed: str, low: float | None = None, high: float | None = None, above_low: bool = False):
    """An argparse type: a finite number within [low, high] (above `low` if `above_low`), else a
    one-line error that says what is allowed."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text[:80]!r}; allowed: {allowed}") from None
        too_low = low is not None and (value <= low if above_low else value < low)
        if (low is not None or high is not None) and (not math.isfinite(value) or too_low or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"got {text[:80]!r}; allowed: {allowed}")
        return value

    return parse


class Busy(RuntimeError):
    """The server cannot take this run now (every slot of its kind is taken); the message says what to do."""


class Cancelled(RuntimeError):
    """A run was stopped by its visitor (raised from a progress callback between steps)."""
