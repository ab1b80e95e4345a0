"""Learned controller: a regressor predicts the error from p and frame-level change statistics,
and the controller picks the largest p on a grid whose predicted error is within budget.

The regressor is scikit-learn's HistGradientBoostingRegressor with a monotone increasing
constraint on p (more filtering never predicts less error, so "the largest p under budget" is
well defined). It is saved as plain JSON (the trees' arrays) and predicted with numpy after
loading: nothing on disk can execute code, and loading needs no scikit-learn.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numba
import numpy as np

from deluceva.controller.base import FEATURES, Observation, clamp
from deluceva.errors import DelucevaError

__all__ = ["TreeEnsemble", "LearnedController", "FORMAT"]

FORMAT = "deluceva-learned-controller"
VERSION = 1
ERROR_FLOOR = 1e-4  # the model predicts log(error + ERROR_FLOOR)
_TREE_KEYS = ("feature", "threshold", "missing_left", "left", "right", "leaf", "value")
_TREE_DTYPES = {"feature": np.int64, "threshold": np.float64, "missing_left": bool, "left": np.int64,
                "right": np.int64, "leaf": bool, "value": np.float64}


@numba.njit(cache=True, nogil=True)
def _walk_trees(X, roots, feature, threshold, missing_left, left, right, leaf, value, baseline):
    """baseline + the sum over trees of the leaf each row of X reaches (NaN goes where the tree
    sends missing values)."""
    out = np.empty(X.shape[0])
    for row in range(X.shape[0]):
        total = baseline
        for root in roots:
            node = root
            while not leaf[node]:
                x = X[row, feature[node]]
                go_left = missing_left[node] if np.isnan(x) else x <= threshold[node]
                node = left[node] if go_left else right[node]
            total += value[node]
        out[row] = total
    return out


@numba.njit(cache=True, nogil=True)
def _last_within(grid, row, limit, roots, feature, threshold, missing_left, left, right, leaf, value, baseline):
    """The largest i whose prediction for `row` with its first feature set to grid[i] is <= limit
    (-1 if none), by bisection: the predictions must not decrease along `grid`."""
    X = np.empty((1, row.shape[0]))
    X[0, :] = row
    low, high = -1, grid.shape[0]  # grid[low] is within (or low = -1), grid[high] is not (or high = len)
    while high - low > 1:
        middle = (low + high) // 2
        X[0, 0] = grid[middle]
        if _walk_trees(X, roots, feature, threshold, missing_left, left, right, leaf, value, baseline)[0] <= limit:
            low = middle
        else:
            high = middle
    return low


@dataclass
class TreeEnsemble:
    """A fitted regression tree ensemble as plain arrays: prediction = baseline + sum of leaves.

    Walked by a compiled loop (`_walk_trees`), ~100 trees for each row: a controller walks them
    on every frame (bisecting its grid, `last_within`). Walked level by level in numpy over
    (rows x trees) node indices, the whole grid cost 0.35 ms a frame on YOLOX-nano (3.5% of its
    dense run), and a Python loop over trees ~10 ms.
    """

    baseline: float
    trees: list[dict[str, np.ndarray]]
    features: tuple[str, ...] = FEATURES
    _flat: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_sklearn(cls, model, features=FEATURES) -> TreeEnsemble:
        """From a fitted HistGradientBoostingRegressor with the squared-error loss."""
        trees = []
        for (predictor,) in model._predictors:  # one tree per iteration for regression
            nodes = predictor.nodes
            trees.append({
                "feature": nodes["feature_idx"].astype(np.int64),
                "threshold": nodes["num_threshold"].astype(np.float64),
                "missing_left": nodes["missing_go_to_left"].astype(bool),
                "left": nodes["left"].astype(np.int64),
                "right": nodes["right"].astype(np.int64),
                "leaf": nodes["is_leaf"].astype(bool),
                "value": nodes["value"].astype(np.float64),
            })
        return cls(float(np.ravel(model._baseline_prediction)[0]), trees, tuple(features))

    def _flatten(self) -> dict[str, np.ndarray]:
        if self._flat is None:
            offsets = np.cumsum([0] + [len(t["leaf"]) for t in self.trees])
            flat = {k: np.concatenate([t[k] for t in self.trees]) if self.trees else np.zeros(0, _TREE_DTYPES[k])
                    for k in _TREE_KEYS}
            for k in ("left", "right"):
                flat[k] = flat[k] + np.repeat(offsets[:-1], [len(t["leaf"]) for t in self.trees])
            flat["roots"] = offsets[:-1]
            self._flat = flat
        return self._flat

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions for rows of X (n, features)."""
        X = np.ascontiguousarray(X, np.float64)
        f = self._flatten()
        return _walk_trees(X, f["roots"], f["feature"], f["threshold"], f["missing_left"], f["left"], f["right"],
                           f["leaf"], f["value"], float(self.baseline))

    def last_within(self, grid: np.ndarray, row: np.ndarray, limit: float) -> int:
        """The largest index i of `grid` (ascending values of the first feature) whose prediction
        for `row`, its first feature set to grid[i], is at most `limit`; -1 if none. Found by
        bisection, so the predictions must not decrease along the grid (the learned controller's
        monotone constraint on p): about 7 rows walked instead of the whole grid's 100."""
        f = self._flatten()
        return int(_last_within(np.ascontiguousarray(grid, np.float64), np.ascontiguousarray(row, np.float64),
                                float(limit), f["roots"], f["feature"], f["threshold"], f["missing_left"], f["left"],
                                f["right"], f["leaf"], f["value"], float(self.baseline)))

    def to_dict(self) -> dict:
        return {
            "baseline": self.baseline,
            "features": list(self.features),
            "trees": [{k: t[k].tolist() for k in _TREE_KEYS} for t in self.trees],
        }

    @classmethod
    def from_dict(cls, data: Mapping, label: str = "learned controller") -> TreeEnsemble:
        """Rebuild and validate; DelucevaError naming `label` on anything malformed."""
        def bad(why: str) -> DelucevaError:
            return DelucevaError(f"{label}: corrupt learned controller ({why})")

        try:
            baseline = float(data["baseline"])
            features = tuple(str(f) for f in data["features"])
            raw_trees = list(data["trees"])
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"missing or bad field {e}") from None
        if not math.isfinite(baseline):
            raise bad("baseline is not finite")
        if features != FEATURES:
            raise bad(f"features {features} are not {FEATURES}")
        trees = []
        for i, raw in enumerate(raw_trees):
            try:
                t = {
                    "feature": np.asarray(raw["feature"], np.int64),
                    "threshold": np.asarray(raw["threshold"], np.float64),
                    "missing_left": np.asarray(raw["missing_left"], bool),
                    "left": np.asarray(raw["left"], np.int64),
                    "right": np.asarray(raw["right"], np.int64),
                    "leaf": np.asarray(raw["leaf"], bool),
                    "value": np.asarray(raw["value"], np.float64),
                }
            except (KeyError, TypeError, ValueError) as e:
                raise bad(f"tree {i}: missing or bad field {e}") from None
            n = len(t["leaf"])
            if n == 0 or any(t[k].shape != (n,) for k in _TREE_KEYS):
                raise bad(f"tree {i}: arrays of different lengths")
            inner = ~t["leaf"]
            idx = np.arange(n)
            # Children strictly after their parent (as sklearn builds them): every walk ends.
            if inner.any() and (
                np.any(t["left"][inner] <= idx[inner]) or np.any(t["right"][inner] <= idx[inner])
                or np.any(t["left"][inner] >= n) or np.any(t["right"][inner] >= n)
            ):
                raise bad(f"tree {i}: child index out of order or range")
            if np.any((t["feature"][inner] < 0) | (t["feature"][inner] >= len(features))):
                raise bad(f"tree {i}: feature index out of range")
            if not np.all(np.isfinite(t["value"])) or np.any(np.isinf(t["threshold"][inner])):
                raise bad(f"tree {i}: non-finite value")
            trees.append(t)
        return cls(baseline, trees, features)


def _rows(samples) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) from samples: Observations with an error, mappings with FEATURES + "error", or an
    (X, y) pair of arrays."""
    if isinstance(samples, tuple) and len(samples) == 2 and hasattr(samples[0], "shape"):
        X, y = np.asarray(samples[0], np.float64), np.asarray(samples[1], np.float64)
    else:
        X, y = [], []
        for s in samples:
            get = s.get if isinstance(s, Mapping) else lambda k, s=s: getattr(s, k, None)
            error = get("error")
            if error is None:
                continue
            X.append([float(get(f) or 0.0) for f in FEATURES])
            y.append(float(error))
        X, y = np.asarray(X, np.float64).reshape(-1, len(FEATURES)), np.asarray(y, np.float64)
    if X.ndim != 2 or X.shape[1] != len(FEATURES) or len(X) != len(y):
        raise DelucevaError(f"calibration samples need columns {FEATURES} and an error each; got {X.shape}, {y.shape}")
    finite = np.isfinite(X).all(1) & np.isfinite(y)
    return X[finite], y[finite]


@dataclass
class LearnedState:
    """What the learned controller remembers between frames."""

    percentage: float = 0.0
    correction: float = 0.0  # running mean of measured - predicted error at the p used
    integral: float = 0.0  # ki x the sum of (measured error - aim): what holds the mean at the aim
    updates: int = 0


@dataclass
class LearnedController:
    """Picks the largest p on `grid` whose predicted error, plus a running correction and an
    integral term, is within the aim, budget x (1 - margin).

    The running correction (an average of measured minus predicted errors) follows the model's
    bias quickly; the integral term, ki x the sum of (measured error - aim), is what holds the
    *mean* measured error at the aim, as a PI controller's integral does. Without it, on a
    detection metric whose errors are 0 on most references and several budgets on a few, the
    mean sat on the budget (0.0194-0.021 against 0.02 on YOLOX-nano / intersection_cctv).

    Args:
        budget: the error to stay within.
        model: the fitted TreeEnsemble (None until `fit` or `from_json`).
        p_max: the largest p on the grid.
        step: grid spacing in p.
        adapt: weight of each measured error in the running correction (0 = trust the model).
        margin: aim at budget x (1 - margin).
        ki: integral gain (0 = none); the integral stays within [-aim, 10 x budget].

    Example:
        >>> ctl = LearnedController(budget=0.05).fit(samples)        # doctest: +SKIP
        >>> ctl.to_json("controller.json")                            # doctest: +SKIP
    """

    budget: float
    model: TreeEnsemble | None = None
    p_max: float = 0.99
    step: float = 0.01
    adapt: float = 0.3
    margin: float = 0.0
    ki: float = 0.2
    wants_reference: bool = False
    uses_statistics: ClassVar[bool] = True  # changed_tiles and mean_abs_change are features
    feature_range: list[list[float]] | None = None
    state: LearnedState = field(default_factory=LearnedState)

    def __post_init__(self):
        if not self.budget > 0 or not math.isfinite(self.budget):
            raise DelucevaError(f"error budget {self.budget} must be a positive number")
        if not 0 < self.p_max < 1 or not 0 < self.step <= self.p_max:
            raise DelucevaError(f"need 0 < step <= p_max < 1, got step={self.step}, p_max={self.p_max}")
        if not 0 <= self.adapt <= 1 or not 0 <= self.margin < 1:
            raise DelucevaError(f"adapt must be in [0, 1] and margin in [0, 1), got {self.adapt}, {self.margin}")
        if not 0 <= self.ki <= 1:
            raise DelucevaError(f"ki must be in [0, 1], got {self.ki}")

    @property
    def grid(self) -> np.ndarray:
        return np.round(np.arange(0.0, self.p_max + 1e-9, self.step), 6)

    def fit(self, samples, max_iter: int = 100, min_samples_leaf: int | None = None, seed: int = 0) -> LearnedController:
        """Fit the regressor on calibration samples (see `_rows`); returns self."""
        from sklearn.ensemble import HistGradientBoostingRegressor
        from threadpoolctl import threadpool_limits

        X, y = _rows(samples)
        if len(X) < 10:
            raise DelucevaError(f"need at least 10 calibration samples with a measured error, got {len(X)}")
        leaf = min_samples_leaf or max(5, len(X) // 50)
        regressor = HistGradientBoostingRegressor(
            max_iter=max_iter, learning_rate=0.1, max_leaf_nodes=15, min_samples_leaf=leaf,
            monotonic_cst=[1] + [0] * (len(FEATURES) - 1), early_stopping=False, random_state=seed,
        )
        # Fit log(error + floor): errors span decades (near p = 1 they are 1000x the budget),
        # and squared loss on raw errors would spend every split on those.
        # One OpenMP thread: calibration sets are small, and on a busy 2-core machine the
        # default thread pool made a 0.15 s fit take 7 s.
        with threadpool_limits(1):
            regressor.fit(X, np.log(np.maximum(y, 0) + ERROR_FLOOR))
        self.model = TreeEnsemble.from_sklearn(regressor)
        self.feature_range = [[float(X[:, j].min()), float(X[:, j].max())] for j in range(X.shape[1])]
        self.reset()
        return self

    def predict(self, percentages, observation: Observation) -> np.ndarray:
        """Predicted error at each p in `percentages` for the frame statistics in `observation`."""
        if self.model is None:
            raise DelucevaError("learned controller has no model: fit it or load one with from_json")
        p = np.atleast_1d(np.asarray(percentages, np.float64))
        X = np.empty((len(p), len(FEATURES)))
        X[:, 0] = p
        for j, name in enumerate(FEATURES[1:], 1):
            X[:, j] = float(getattr(observation, name, 0.0) or 0.0)
        return np.exp(self.model.predict(X)) - ERROR_FLOOR

    def curve(self, observation: Observation) -> np.ndarray:
        """Predicted error over the whole grid for this frame's statistics."""
        return self.predict(self.grid, observation)

    @property
    def aim(self) -> float:
        return self.budget * (1 - self.margin)

    def choose(self, observation: Observation) -> float:
        """The largest grid p whose predicted error + correction + integral <= the aim; 0 if none.

        The predicted error rises with p (the regressor's monotone constraint), so the grid is
        bisected: on every frame, predicting the whole grid cost 0.1-0.15 ms, 1-1.5% of
        YOLOX-nano's dense run, and memoising it missed on 101 of 120 frames of a still scene.
        """
        if self.model is None:
            raise DelucevaError("learned controller has no model: fit it or load one with from_json")
        allowed = self.aim - self.state.correction - self.state.integral
        if allowed + ERROR_FLOOR <= 0:  # exp(prediction) - ERROR_FLOOR never gets there
            return 0.0
        grid = self.grid
        row = np.array([0.0] + [float(getattr(observation, name, 0.0) or 0.0) for name in FEATURES[1:]])
        index = self.model.last_within(grid, row, math.log(allowed + ERROR_FLOOR))
        return float(grid[index]) if index >= 0 else 0.0

    def reset(self) -> None:
        self.state = LearnedState()

    def update(self, observation: Observation) -> float:
        s = self.state
        if observation.error is not None and self.adapt > 0 and math.isfinite(observation.error):
            # The error measured at the p used, against what the model expected there.
            expected = float(self.predict([observation.percentage], observation)[0])
            residual = float(observation.error) - expected
            s.correction += self.adapt * (residual - s.correction)
            s.integral = clamp(s.integral + self.ki * (float(observation.error) - self.aim), -self.aim, 10 * self.budget)
            s.updates += 1
        s.percentage = clamp(self.choose(observation), 0.0, self.p_max)
        return s.percentage

    # -- files -----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        if self.model is None:
            raise DelucevaError("learned controller has no model to save")
        return {
            "format": FORMAT, "version": VERSION, "budget": self.budget, "p_max": self.p_max,
            "step": self.step, "adapt": self.adapt, "margin": self.margin, "ki": self.ki,
            "feature_range": self.feature_range, "target": f"log(error + {ERROR_FLOOR})",
            "model": self.model.to_dict(),
        }

    def to_json(self, path: str | os.PathLike) -> None:
        """Save as plain JSON (the trees' arrays and the settings), whole or not at all."""
        from deluceva.files import write_text

        write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def from_json(cls, path: str | os.PathLike, budget: float | None = None) -> LearnedController:
        """Load and validate a saved controller; `budget` overrides the saved one.

        Raises:
            DelucevaError: missing file, not JSON, another format or version, malformed trees.
        """
        label = str(path)
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DelucevaError(f"{label}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DelucevaError(f"{label}: not a learned controller JSON file ({type(e).__name__})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DelucevaError(f"{label}: not a learned controller file (format is not {FORMAT!r})")
        if data.get("version") != VERSION:
            raise DelucevaError(f"{label}: learned controller version {data.get('version')!r} is not {VERSION}")
        if data.get("target") != f"log(error + {ERROR_FLOOR})":
            raise DelucevaError(f"{label}: corrupt learned controller (target {data.get('target')!r})")
        if not isinstance(data.get("model"), dict):
            raise DelucevaError(f"{label}: corrupt learned controller (no model)")
        model = TreeEnsemble.from_dict(data["model"], label)
        try:
            return cls(
                budget=float(budget if budget is not None else data["budget"]), model=model,
                p_max=float(data.get("p_max", 0.99)), step=float(data.get("step", 0.01)),
                adapt=float(data.get("adapt", 0.3)), margin=float(data.get("margin", 0.0)),
                ki=float(data.get("ki", 0.0)),
                feature_range=data.get("feature_range"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DelucevaError(f"{label}: corrupt learned controller (bad setting {e})") from None
        except DelucevaError as e:
            raise DelucevaError(f"{label}: {e}") from None
