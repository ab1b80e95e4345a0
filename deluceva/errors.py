"""The one exception type that deluceva raises for bad input; the CLI prints it as one line."""

__all__ = ["DelucevaError", "check_percentage"]


class DelucevaError(Exception):
    """Bad input or options: a message a user can act on, naming the file and the problem."""


def check_percentage(value, what: str = "filtering percentage") -> float:
    """`value` as a float when it is a filtering percentage, in [0, 1); DelucevaError otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DelucevaError(f"{what} {value!r} is not a number") from None
    if not 0.0 <= number < 1.0:  # (NaN fails too)
        raise DelucevaError(f"{what} {value} is outside [0, 1)")
    return number
