"""The fixed controller: the same filtering percentage on every frame."""

from __future__ import annotations

from dataclasses import dataclass

from deluceva.controller.base import Observation
from deluceva.errors import check_percentage

__all__ = ["FixedController"]


@dataclass
class FixedController:
    """Always `percentage`, whatever is measured.

    Example:
        >>> FixedController(0.5).update(Observation(frame=3, error=0.2))
        0.5
    """

    percentage: float = 0.0
    wants_reference: bool = False

    def __post_init__(self):
        self.percentage = check_percentage(self.percentage, "percentage")

    def update(self, observation: Observation) -> float:
        return self.percentage

    def reset(self) -> None:
        pass
