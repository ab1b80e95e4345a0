"""argparse types shared by the subcommands: each refuses a bad value with a one-line message."""

from __future__ import annotations

import argparse
import math

from deluceva.errors import DelucevaError, check_percentage

__all__ = ["percentage", "positive_int", "non_negative_int", "budget", "seconds"]


def _parse(text: str, cast, what: str):
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def percentage(text: str) -> float:
    value = _parse(text, float, "a number")
    try:
        return check_percentage(value, "percentage")
    except DelucevaError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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


def seconds(text: str) -> float:
    value = _parse(text, float, "a number of seconds")
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{value} must be a number of seconds, at least 0")
    return value
