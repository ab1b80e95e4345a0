"""argparse types shared by the subcommands: each refuses a bad value with a one-line message."""

from __future__ import annotations

import argparse
import math

__all__ = ["percentage", "positive_int", "non_negative_int", "budget"]


def _parse(text: str, cast, what: str):
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def percentage(text: str) -> float:
    value = _parse(text, float, "a number")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"percentage {value} is outside [0, 1)")
    return value


def positive_int(text: str) -> int:
    value = _parse(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def budget(text: str) -> float:
    value = _parse(text, float, "a number")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"error budget {value} must be a positive number")
    return value
