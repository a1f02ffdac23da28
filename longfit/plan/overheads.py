"""Fit the engine-overhead fields of a ``HardwareProfile`` to timed decode steps (``longfit plan --calibrate``).

A decode step of ``batch`` sequences on a model of ``num_layers`` layers is modelled as the cost model's lower bound
plus ``cost_model.decode_overhead_s``, which is linear in five non-negative coefficients:

    measured − bound = step + batch · per_seq + layers · (per_layer + batch · per_seq_layer)
                       + (kv_read_factor − 1) · kv_bytes_read / bandwidth

``fit_overheads`` solves that by non-negative least squares on relative errors (every residual divided by its
measured time, so a 5 ms step counts as much as a 50 ms one: the planner's target is a relative one, ±25%).
Pure Python, no torch: ``bench/calibrate.py`` does the timing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from longfit.plan.cost_model import OVERHEAD_FIELDS, overhead_terms

_RANK_TOLERANCE = 1e-9  # relative pivot below which the (column-normalised) normal equations are singular


@dataclass(frozen=True, slots=True)
class StepSample:
    """One timed decode step shape.

    num_layers: decoder layers of the model timed.
    batch: sequences decoded together.
    kv_bytes_read: KV bytes the step reads, all sequences and layers (bytes).
    lower_bound_s: the cost model's bound for this step on the profile being calibrated (seconds).
    measured_s: the measured step time, e.g. the median of several steps (seconds).
    """

    num_layers: int
    batch: int
    kv_bytes_read: float
    lower_bound_s: float
    measured_s: float

    def __post_init__(self) -> None:
        for name in ("num_layers", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StepSample.{name} must be an integer >= 1, got {value!r}")
        for name in ("kv_bytes_read", "lower_bound_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"StepSample.{name} must be a finite number >= 0, got {value!r}")
        if not math.isfinite(self.measured_s) or not self.measured_s > 0:
            raise ValueError(f"StepSample.measured_s must be a finite number > 0, got {self.measured_s!r}")


@dataclass(frozen=True, slots=True)
class OverheadFit:
    """The fitted coefficients, keyed by ``HardwareProfile`` field (seconds; kv_read_factor unitless, >= 1), and
    the relative error (predicted ÷ measured − 1) of every sample under the fitted model."""

    coefficients: dict[str, float]
    relative_errors: list[float]

    @property
    def rms_relative_error(self) -> float:
        return math.sqrt(sum(e * e for e in self.relative_errors) / len(self.relative_errors))


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when a pivot is (relatively) zero: singular system."""
    n = len(rhs)
    a = [row[:] + [b] for row, b in zip(matrix, rhs)]
    scale = max((abs(v) for row in matrix for v in row), default=0.0) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) <= _RANK_TOLERANCE * scale:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for c in range(col, n + 1):
                a[r][c] -= f * a[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (a[r][n] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


def _least_squares(rows: list[list[float]], target: list[float], columns: Sequence[int]) -> list[float] | None:
    """Unconstrained least squares restricted to ``columns`` (normal equations; the columns are pre-normalised)."""
    gram = [[sum(r[i] * r[j] for r in rows) for j in columns] for i in columns]
    moment = [sum(r[i] * t for r, t in zip(rows, target)) for i in columns]
    return _solve(gram, moment)


def nonnegative_least_squares(rows: list[list[float]], target: list[float]) -> list[float]:
    """min ‖rows · x − target‖² subject to x >= 0, exactly, by trying every support set.

    The problem is convex, so its optimum is the unconstrained solution on its own support; among all supports
    whose solution is feasible, the one with the smallest residual is that optimum. 2^k solves of k ≤ 5 unknowns.
    Raises ValueError when ``rows`` do not determine every unknown (rank-deficient).
    """
    k = len(rows[0])
    norms = [math.sqrt(sum(r[j] ** 2 for r in rows)) or 1.0 for j in range(k)]
    scaled = [[r[j] / norms[j] for j in range(k)] for r in rows]  # conditioning: columns differ by 1e6
    if _least_squares(scaled, target, range(k)) is None:
        raise ValueError("step samples do not determine every overhead coefficient: they need two layer counts with "
                         "two batch sizes at each, and two context depths at one batch and layer count")
    best, best_error = [0.0] * k, sum(t * t for t in target)
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            solution = _least_squares(scaled, target, support)
            if solution is None or min(solution) < 0:
                continue
            x = [0.0] * k
            for j, value in zip(support, solution):
                x[j] = value
            error = sum((sum(r[j] * x[j] for j in range(k)) - t) ** 2 for r, t in zip(scaled, target))
            if error < best_error:
                best, best_error = x, error
    return [value / norm for value, norm in zip(best, norms)]


def fit_overheads(samples: Sequence[StepSample], bandwidth: float) -> OverheadFit:
    """Fit ``OVERHEAD_FIELDS`` to ``samples`` (see the module docstring); ``bandwidth`` in bytes/s is the profile's
    ``memory_bandwidth``, the same one the samples' lower bounds used.

    Raises:
        ValueError: fewer samples than coefficients, a non-positive bandwidth, or samples that do not determine
            every coefficient.
    """
    if not math.isfinite(bandwidth) or not bandwidth > 0:
        raise ValueError(f"bandwidth must be a positive number of bytes/s, got {bandwidth!r}")
    if len(samples) < len(OVERHEAD_FIELDS):
        raise ValueError(f"samples must hold at least {len(OVERHEAD_FIELDS)} step samples (one per coefficient), "
                         f"got {len(samples)}")
    rows, target = [], []
    for s in samples:
        terms = overhead_terms(s.num_layers, s.batch, s.kv_bytes_read, bandwidth)
        rows.append([t / s.measured_s for t in terms])  # relative residuals
        target.append((s.measured_s - s.lower_bound_s) / s.measured_s)
    x = nonnegative_least_squares(rows, target)
    coefficients = dict(zip(OVERHEAD_FIELDS, x))
    coefficients["kv_read_factor"] = 1.0 + x[-1]
    errors = [(s.lower_bound_s + sum(c * t for c, t in zip(x, overhead_terms(s.num_layers, s.batch, s.kv_bytes_read,
                                                                           bandwidth)))) / s.measured_s - 1.0
              for s in samples]
    return OverheadFit(coefficients, errors)
