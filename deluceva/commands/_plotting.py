"""matplotlib for the commands that draw (`bench --plot`, `explain --graph`): an optional dependency."""

from __future__ import annotations

from deluceva.errors import DelucevaError

__all__ = ["pyplot"]


def pyplot(option: str):
    """matplotlib.pyplot on the file-only Agg backend, or a one-line error naming `option`."""
    try:
        import matplotlib
    except ImportError:
        raise DelucevaError(f"{option} needs matplotlib: pip install 'deluceva[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
