"""The controller protocol: `update(observation) -> percentage`, state in a dataclass, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["Observation", "Controller", "FEATURES", "clamp"]

# Frame-level change statistics a learned controller may use, in this order.
FEATURES = ("percentage", "changed_tiles", "mean_abs_change")


@dataclass
class Observation:
    """What the run loop tells a controller after each frame.

    Attributes:
        frame: index of the frame just run.
        error: the measured error against the dense reference when the frame was a reference
            frame, else None.
        percentage: the filtering percentage the frame ran at.
        changed_tiles: share of input tiles that changed noticeably since the last frame (0..1).
        mean_abs_change: mean absolute change of the model input since the last frame.
        density: share of the delta work actually done (1.0 on a dense frame).
        statistics: any other frame-level numbers, by name.
    """

    frame: int = 0
    error: float | None = None
    percentage: float = 0.0
    changed_tiles: float = 0.0
    mean_abs_change: float = 0.0
    density: float = 1.0
    statistics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Controller(Protocol):
    """Chooses the filtering percentage for the next frame.

    `wants_reference` may be set to ask the run loop for a dense reference on the next frame.
    A controller with `uses_statistics` set gets the frame-level change statistics in each
    observation; the run loop skips computing them (about 0.6 ms at 416x416) for the others.
    """

    wants_reference: bool

    def update(self, observation: Observation) -> float: ...

    def reset(self) -> None: ...


def clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)
