"""The one exception type that deluceva raises for bad input; the CLI prints it as one line."""

__all__ = ["DelucevaError"]


class DelucevaError(Exception):
    """Bad input or options: a message a user can act on, naming the file and the problem."""
