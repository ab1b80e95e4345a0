"""PI controller holding the measured error at the budget, acting on u = -log(1 - p).

Why u: the error grows steeply as p approaches 1, and -log(1 - p) spreads that end out (p = 0.9,
0.99 are u = 2.3, 4.6), so one gain suits the whole range. The error enters as the normalised
tracking error r = 1 - error / budget, linear so that the integral drives the *mean* error to
the budget (a detection error is often 0 on most reference frames and a few budgets on others;
a log error would hold the geometric mean instead and let the mean run over). r is clipped at
-`overshoot_clip`, so one wild reference frame cannot throw u across the whole range.

Law (positional form): I += ki * r; u = clamp(kp * r + I), I starting at u(p_start). Anti-windup by conditional
integration: upwards the integral moves only up to where the output just saturates and never
above u_max, so after a long time at p_max (a static scene) the controller reacts on the first
reference frame with too much error. Downwards it may fall below u_min by at most `debt`
(in u), on purpose: see `update` for the measured reason. The output always stays within
[p_min, p_max]; the integral within [u_min - debt, u_max].

Gains (kp = 0.1, ki = 0.2, per reference frame) were tuned by grid search
(`deluceva.controller.simulate.tune_pi`, 2.7 s) on simulated plants error = budget *
exp(alpha * (u - u*)), alpha in 0.5..3 and u* in 0.5..4 (p* from 0.4 to 0.98): noise-free for
settling steps and oscillation (sign changes of error - budget after settling), and with
lognormal noise (sigma 0.3) plus quantised detection-like errors for the mean-error bias and
the jitter of u. Larger ki settles faster but overshoots and oscillates on the steep plants
(alpha 3); smaller ki leaves the mean error below budget for long. Trade-off: since r <= 1
under budget, the controller climbs at most (kp + ki) in u per reference frame; from p = 0 the
error is within 10% of the budget after 18-20 reference frames on these plants, with no
overshoot (measured in tests/test_controllers.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from deluceva.controller.base import Observation, clamp
from deluceva.errors import DelucevaError

__all__ = ["PIController", "PIState", "to_u", "to_p"]


def to_u(p: float) -> float:
    """Filtering percentage to the controlled variable u = -log(1 - p)."""
    return -math.log1p(-p)


def to_p(u: float) -> float:
    """u = -log(1 - p) back to the filtering percentage."""
    return -math.expm1(-u)


@dataclass
class PIState:
    """What the PI controller remembers between frames."""

    integral: float = 0.0  # in u units, within [u_min - debt, u_max]
    percentage: float = 0.0
    updates: int = 0  # error measurements seen
    last_error: float | None = None
    first_side: bool | None = None  # whether the first measurement was over the setpoint
    crossed: bool = False  # a later one was on the other side: the steady gains apply


@dataclass
class PIController:
    """Holds the error measured on reference frames at `budget` by moving p.

    Args:
        budget: the error to hold (e.g. 0.05 for rel-l2, 0.02 for det).
        kp, ki: proportional and integral gains on r = 1 - error / budget, in u units per update.
        p_min, p_max: the output range (p_max < 1).
        p_start: the percentage before the first measurement.
        overshoot_clip: r is clipped at -overshoot_clip (an error above (1 + clip) x budget
            counts as that much).
        setpoint: the share of the budget the mean error is held at; below 1 so that a finite
            run, whose mean wanders around the setpoint, stays within the budget.
        debt: how far (in u) the integral may fall below the output range after errors far
            over budget; the output itself stays within [p_min, p_max].
        steady_kp, steady_ki: the gains once the error has crossed the setpoint (None: kp and ki
            throughout). Settling wants large gains; holding the mean on spiky, quantised errors
            wants small ones, since every spike throws u by ki x the overshoot: with 0.1 / 0.2
            throughout, a simulated detection-like plant ran at 0.82x the speed of the best
            fixed p on a 0.1 grid, with 0.05 / 0.05 once crossed at 0.96-1.10x (tests/test_controllers.py).

    Updates only when an error measurement arrives; between them the output stays put.

    Example:
        >>> pi = PIController(budget=0.05)
        >>> p = pi.update(Observation(frame=30, error=0.0, percentage=0.0))
        >>> 0 < p < 0.99
        True
    """

    budget: float
    kp: float = 0.1
    ki: float = 0.2
    p_min: float = 0.0
    p_max: float = 0.99
    p_start: float = 0.0
    overshoot_clip: float = 30.0
    debt: float = 10.0
    setpoint: float = 1.0
    steady_kp: float | None = None
    steady_ki: float | None = None
    wants_reference: bool = False
    state: PIState = field(default_factory=PIState)

    def __post_init__(self):
        if not self.budget > 0 or not math.isfinite(self.budget):
            raise DelucevaError(f"error budget {self.budget} must be a positive number")
        if not 0.0 <= self.p_min <= self.p_max < 1.0:
            raise DelucevaError(f"need 0 <= p_min <= p_max < 1, got p_min={self.p_min}, p_max={self.p_max}")
        if self.kp < 0 or self.ki <= 0:
            raise DelucevaError(f"gains must be kp >= 0 and ki > 0, got kp={self.kp}, ki={self.ki}")
        if not self.p_min <= self.p_start <= self.p_max:
            raise DelucevaError(f"p_start {self.p_start} is outside [{self.p_min}, {self.p_max}]")
        self.reset()

    @property
    def u_range(self) -> tuple[float, float]:
        return to_u(self.p_min), to_u(self.p_max)

    def reset(self) -> None:
        self.state = PIState(integral=to_u(self.p_start), percentage=self.p_start)

    @property
    def gains(self) -> tuple[float, float]:
        """(kp, ki) now: the steady ones once the error has crossed the setpoint."""
        if self.state.crossed:
            return (self.kp if self.steady_kp is None else self.steady_kp,
                    self.ki if self.steady_ki is None else self.steady_ki)
        return self.kp, self.ki

    def update(self, observation: Observation) -> float:
        s = self.state
        if observation.error is None:
            return s.percentage
        error = float(observation.error)
        if not math.isfinite(error) or error < 0:
            error = (1 + self.overshoot_clip) * self.budget  # a broken measurement: back off
        r = max(1.0 - error / (self.setpoint * self.budget), -self.overshoot_clip)
        if r != 0:
            if s.first_side is None:
                s.first_side = r < 0
            elif (r < 0) != s.first_side:
                s.crossed = True
        kp, ki = self.gains
        u_min, u_max = self.u_range
        integral = s.integral + ki * r
        raw = kp * r + integral
        # Conditional integration upwards: integrate only up to where the output just
        # saturates, so a long still scene at p_max does not wind the integral up.
        if raw > u_max and r > 0:
            integral = max(s.integral, u_max - kp * r)
        # Downwards the integral may run up to `debt` below the range: on a plant whose error
        # jumps from 0 to many budgets (detections), that debt keeps p low long enough for the
        # *mean* error to meet the budget. Clamped at u_min it was forgotten, and on YOLOX-nano
        # with `det` the controller swung between p = 0 and the failure point (mean 0.16
        # against a budget of 0.02 over 300 frames).
        s.integral = clamp(integral, u_min - self.debt, u_max)
        s.percentage = clamp(to_p(clamp(kp * r + s.integral, u_min, u_max)), self.p_min, self.p_max)
        s.updates += 1
        s.last_error = error
        return s.percentage
