"""Simulated plants for tuning and testing controllers: error = g(p) with noise, no model needed.

The plant stands in for "run the video at p, measure the error on the next reference frame":
error = budget * exp(alpha * (u - u_star)) * lognormal noise, u = -log(1 - p), optionally
quantised like a detection error (1 - F1 over a few boxes comes in steps).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from deluceva.controller.base import Observation
from deluceva.controller.pi import PIController, to_p, to_u

__all__ = ["Plant", "simulate", "tune_pi", "score_trace"]


@dataclass
class Plant:
    """error(p) = budget * exp(alpha * (u(p) - u_star)) * exp(N(0, sigma)); u(p*) = u_star.

    quantum > 0 rounds the error to multiples of it at random (expected value kept): a
    detection error over a handful of boxes is 0 on most frames and a step on a few.
    """

    budget: float = 0.05
    alpha: float = 1.0
    u_star: float = 2.0
    sigma: float = 0.3
    quantum: float = 0.0

    @property
    def p_star(self) -> float:
        return to_p(self.u_star)

    def error(self, p: float, rng: np.random.Generator) -> float:
        mean = self.budget * math.exp(self.alpha * (to_u(p) - self.u_star))
        e = mean * math.exp(rng.normal(0, self.sigma) - self.sigma**2 / 2) if self.sigma else mean
        if self.quantum:
            steps = e / self.quantum
            e = self.quantum * (math.floor(steps) + (rng.random() < steps - math.floor(steps)))
        return min(e, 10.0)


def simulate(controller, plant: Plant, steps: int = 80, seed: int = 0, reference_every: int = 1):
    """Run `controller` against `plant` for `steps` reference frames; returns (ps, errors) arrays."""
    rng = np.random.default_rng(seed)
    p = controller.update(Observation(frame=0, error=None, percentage=0.0))
    ps, errors = [], []
    for k in range(steps):
        e = plant.error(p, rng)
        ps.append(p)
        errors.append(e)
        p = controller.update(Observation(frame=(k + 1) * reference_every, error=e, percentage=p))
    return np.array(ps), np.array(errors)


def score_trace(ps: np.ndarray, errors: np.ndarray, plant: Plant, band: float = 0.1) -> tuple[int, int]:
    """(steps until the error stays within `band` x budget of the budget, sign changes of
    error - budget after that). Meant for a noise-free plant: settling and oscillation."""
    off = np.abs(errors / plant.budget - 1) > band
    outside = np.flatnonzero(off)
    settled = int(outside[-1] + 1) if len(outside) else 0
    after = np.sign(errors[settled:] - plant.budget)
    after = after[after != 0]
    return settled, int(np.count_nonzero(np.diff(after)))


def tune_pi(kps=(0.0, 0.05, 0.1, 0.15, 0.2, 0.3), kis=(0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.45, 0.6), seeds=range(4)):
    """Grid-search (kp, ki) over a family of plants; returns a sorted list of (cost, kp, ki, parts).

    cost = settling steps / 20 on noise-free plants (+1 per step never settled, +0.5 per
    sign change of error - budget after settling: oscillation) + 2 x |mean error / budget - 1|
    after the first 20 steps on noisy plants + the standard deviation of u there (how much p
    jitters with measurement noise).
    """
    shapes = list(itertools.product((0.5, 1.0, 2.0, 3.0), (0.5, 2.0, 4.0)))
    noisy = [Plant(alpha=a, u_star=us, sigma=0.3) for a, us in shapes]
    noisy += [Plant(budget=0.02, alpha=a, u_star=2.5, sigma=0.3, quantum=0.05) for a in (1.0, 2.0)]
    results = []
    for kp, ki in itertools.product(kps, kis):
        settle = oscillation = bias = jitter = 0.0
        for a, us in shapes:
            plant = Plant(alpha=a, u_star=us, sigma=0.0)
            ps, errors = simulate(PIController(plant.budget, kp=kp, ki=ki), plant, steps=80)
            steps, flips = score_trace(ps, errors, plant)
            settle += steps / 20 + (steps >= 80)
            oscillation += 0.5 * flips
        for plant, seed in itertools.product(noisy, seeds):
            ps, errors = simulate(PIController(plant.budget, kp=kp, ki=ki), plant, steps=120, seed=seed)
            bias += 2 * abs(errors[20:].mean() / plant.budget - 1)
            jitter += float(np.std(-np.log1p(-ps[20:])))
        parts = (settle / len(shapes), oscillation / len(shapes), bias / (len(noisy) * len(seeds)),
                 jitter / (len(noisy) * len(seeds)))
        results.append((sum(parts), kp, ki, parts))
    return sorted(results, key=lambda r: r[0])
