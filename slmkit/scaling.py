"""Scaling laws fitted to final validation losses, with bootstrap intervals over runs.

With ``N`` the non-embedding parameters and ``D`` the training tokens seen, two laws:

    L(N)    = E + A / N^alpha
    L(N, D) = E + A / N^alpha + B / D^beta

are fitted as in Chinchilla's third approach (Hoffmann et al. 2022) and its replication
(Besiroglu et al. 2024): in log space, ``e = log E``, ``a = log A``, ``b = log B``, the
predicted log loss is ``LSE(a - alpha log N, b - beta log D, e)``, and the fit minimises
the Huber loss (delta 1e-3) of its difference from ``log L``. The loss is computed at
every start of a grid, BFGS runs from the best of them, and the lowest end wins; it is a
law only if every parameter ends inside its plausible range (an exponent in (0, 5), E, A
and B neither 0 nor infinite). The Huber loss lets one odd run pull the fit less than
squares would.

The intervals come from a bootstrap over runs: the runs are drawn with replacement, the law
is fitted again to each draw (from the full fit's parameters and the draw's best grid
start), and each parameter's interval is the 2.5 and 97.5 percentiles of its refits (the
percentile interval). The band of the fitted curve, the compute-optimal allocation and a
held-out run's prediction get theirs the same way.

Nothing here reads run folders; :mod:`slmkit.scaling_runs` turns runs into points.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize
from scipy.special import huber

from slmkit.errors import SlmkitError

#: the Huber loss's threshold on residuals of log L (Hoffmann et al. use 1e-3)
HUBER_DELTA = 1e-3
#: the central interval the bootstrap reports
LEVEL = 0.95

Array = NDArray[np.float64]


class FitError(SlmkitError):
    """A fit that did not converge, or points that cannot determine one."""


@attrs.define(frozen=True)
class Law:
    """One functional form: its parameters, where a fit of it is believed, its starts."""

    name: str
    formula: str
    #: natural-scale names; the fit works on log E, log A (, log B) and the exponents
    parameters: tuple[str, ...]
    #: the open interval (low, high) of each log-space parameter (e, a, alpha (, b, beta))
    #: a fit must end inside: an exponent at 0 or past 5, or E, A, B gone to 0 or to
    #: infinity, is a fit that did not converge, not a law
    ranges: tuple[tuple[float, float], ...]
    #: the start values of each log-space parameter (every combination is a start)
    start_grid: tuple[tuple[float, ...], ...]

    @property
    def uses_tokens(self) -> bool:
        """Whether the law models the tokens seen ``D``."""
        return len(self.parameters) == 5


_LOG_E = (-20.0, 10.0)  # E from 2e-9 to 2e4 nats
_LOG_SCALE = (-20.0, 60.0)  # A, B from 2e-9 to 1e26
_EXPONENT = (0.0, 5.0)
_LOG_E_STARTS = (-1.0, -0.5, 0.0, 0.5, 1.0)
_LOG_SCALE_STARTS = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
_EXPONENT_STARTS = (0.1, 0.3, 0.5, 1.0, 2.0)

LAW_N = Law(
    name="L(N)",
    formula="L(N) = E + A / N^alpha",
    parameters=("E", "A", "alpha"),
    ranges=(_LOG_E, _LOG_SCALE, _EXPONENT),
    start_grid=(_LOG_E_STARTS, _LOG_SCALE_STARTS, _EXPONENT_STARTS),
)
LAW_ND = Law(
    name="L(N, D)",
    formula="L(N, D) = E + A / N^alpha + B / D^beta",
    parameters=("E", "A", "alpha", "B", "beta"),
    ranges=(_LOG_E, _LOG_SCALE, _EXPONENT, _LOG_SCALE, _EXPONENT),
    start_grid=(
        _LOG_E_STARTS,
        _LOG_SCALE_STARTS,
        _EXPONENT_STARTS,
        _LOG_SCALE_STARTS,
        _EXPONENT_STARTS,
    ),
)
#: the grid's starts with the lowest loss that the optimiser then starts from
OPTIMISED_STARTS = 24
#: a bootstrap refit starts from the full fit's parameters and this many of the grid's
REFIT_STARTS = 1


@attrs.define(frozen=True)
class Points:
    """What a law is fitted to: ``N``, ``D`` and the final validation loss of each run."""

    n: Array
    d: Array
    loss: Array

    @classmethod
    def of(cls, n: Sequence[float], d: Sequence[float], loss: Sequence[float]) -> Points:
        """Points from plain sequences of equal length."""
        return cls(*(np.asarray(v, dtype=np.float64) for v in (n, d, loss)))

    def __len__(self) -> int:
        return len(self.n)

    def take(self, index: NDArray[np.intp]) -> Points:
        """The points at ``index`` (a bootstrap draw)."""
        return Points(self.n[index], self.d[index], self.loss[index])

    def distinct(self, law: Law) -> int:
        """How many different points the law can tell apart (``(N, D)`` or ``N``)."""
        keys = set(zip(self.n, self.d, strict=True)) if law.uses_tokens else set(self.n)
        return len(keys)

    def describe(self) -> str:
        """``(N, D, L)`` of every point, for messages."""
        return ", ".join(
            f"({n:,.0f}, {d:,.0f}, {loss:.4f})"
            for n, d, loss in zip(self.n, self.d, self.loss, strict=True)
        )


def log_loss(theta: Array, law: Law, n: Array, d: Array) -> Array:
    """The predicted ``log L`` at ``(n, d)`` for log-space parameters ``theta``."""
    return np.logaddexp.reduce(_terms(theta, law, np.log(n), np.log(d)), axis=-2)


def _terms(theta: Array, law: Law, log_n: Array, log_d: Array) -> Array:
    """The log of each term of the law: E, A / N^alpha (, B / D^beta), one row each.

    ``theta`` is one parameter vector (rows x points) or a stack of them (starts x rows
    x points).
    """
    t = theta[..., None]  # each parameter against every point
    rows = [t[..., 0, :] + np.zeros_like(log_n), t[..., 1, :] - t[..., 2, :] * log_n]
    if law.uses_tokens:
        rows.append(t[..., 3, :] - t[..., 4, :] * log_d)
    return np.stack(rows, axis=-2)


def _huber_losses(thetas: Array, law: Law, log_n: Array, log_d: Array, log_l: Array) -> Array:
    """The summed Huber loss of the log residuals, for each parameter vector of a stack."""
    residual = np.logaddexp.reduce(_terms(thetas, law, log_n, log_d), axis=-2) - log_l
    return np.asarray(huber(HUBER_DELTA, residual).sum(axis=-1))


def _objective(theta: Array, law: Law, log_n: Array, log_d: Array, log_l: Array
               ) -> tuple[float, Array]:  # fmt: skip
    """The summed Huber loss of the log residuals, and its gradient in ``theta``.

    Written out term by term rather than through :func:`_terms` and scipy's logsumexp:
    the optimiser calls it thousands of times on a handful of points, where the per-call
    overhead of those is most of the time.
    """
    size_term = theta[1] - theta[2] * log_n  # log(A / N^alpha)
    lse = np.logaddexp(theta[0], size_term)
    if law.uses_tokens:
        data_term = theta[3] - theta[4] * log_d  # log(B / D^beta)
        lse = np.logaddexp(lse, data_term)
    residual = lse - log_l
    # d huber / d residual, times d LSE / d term (each term's share of the sum)
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)
    size_share = slope * np.exp(size_term - lse)
    grad = [(slope * np.exp(theta[0] - lse)).sum(), size_share.sum(), -size_share @ log_n]
    if law.uses_tokens:
        data_share = slope * np.exp(data_term - lse)
        grad += [data_share.sum(), -data_share @ log_d]
    return float(huber(HUBER_DELTA, residual).sum()), np.array(grad)


def start_grid(law: Law) -> Array:
    """Every combination of the law's start values, one start a row."""
    mesh = np.meshgrid(*law.start_grid, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def best_fit(law: Law, points: Points, grid: Array, n_starts: int,
             extra: Sequence[Array] = ()) -> tuple[Array, float] | None:  # fmt: skip
    """The lowest Huber loss BFGS reaches: ``(theta, loss)``; None when no end is finite.

    The loss is computed at every start of ``grid`` first (cheap), and the optimiser
    starts from the ``n_starts`` lowest, and from each of ``extra``. BFGS, unbounded like
    Hoffmann et al.'s L-BFGS: L-BFGS-B's bounds cost more time in its BLAS calls than the
    fit itself on a busy machine (OpenBLAS threads waiting for cores). Whether the end is
    a law is :func:`out_of_range`'s call.
    """
    log_n, log_d, log_l = np.log(points.n), np.log(points.d), np.log(points.loss)
    order = np.argsort(_huber_losses(grid, law, log_n, log_d, log_l), kind="stable")
    # Optimised around the points' mean log N (and log D): log A and alpha (log B and
    # beta) are then nearly independent, which saves BFGS most of its iterations.
    means = (float(np.mean(log_n)), float(np.mean(log_d)))
    args = (law, log_n - means[0], log_d - means[1], log_l)
    best: tuple[Array, float] | None = None
    for start in [*extra, *grid[order[:n_starts]]]:
        with np.errstate(over="ignore", invalid="ignore"):  # a start that runs away
            result = minimize(_objective, _centred(law, start, means, -1), args=args,
                              jac=True, method="BFGS")  # fmt: skip
        theta = _centred(law, result.x, means, +1)
        if not np.isfinite(result.fun) or not np.all(np.isfinite(theta)):
            continue
        if best is None or result.fun < best[1]:
            best = (theta, float(result.fun))
    return best


def _centred(law: Law, theta: Array, means: tuple[float, float], sign: int) -> Array:
    """``theta`` with ``log A += sign alpha mean(log N)`` (and ``log B`` alike): -1 moves
    it to the form centred on the points, +1 back to the law's own."""
    out = np.array(theta, dtype=np.float64)
    out[1] += sign * out[2] * means[0]
    if law.uses_tokens:
        out[3] += sign * out[4] * means[1]
    return out


def out_of_range(law: Law, theta: Array) -> str | None:
    """Why ``theta`` is no law (``"alpha = -0.1 is outside (0, 5)"``), or None."""
    for i, (low, high) in enumerate(law.ranges):
        if not low < theta[i] < high:
            name = law.parameters[i]
            exponent = name in ("alpha", "beta")
            value, low, high = (theta[i], low, high) if exponent else np.exp([theta[i], low, high])
            return f"{name} = {value:.3g} is outside ({low:.3g}, {high:.3g})"
    return None


@attrs.define(frozen=True)
class Estimate:
    """A fitted value and its bootstrap interval."""

    value: float
    low: float
    high: float

    def as_json(self) -> dict[str, float]:
        """``{"value", "low", "high"}``."""
        return {"value": self.value, "low": self.low, "high": self.high}


def _estimate(value: float, draws: Array) -> Estimate:
    low, high = np.percentile(draws, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return Estimate(float(value), float(low), float(high))


def _natural(law: Law, theta: Array) -> Array:
    """Log-space parameters (rows) to E, A, alpha (, B, beta)."""
    out = np.array(theta, dtype=np.float64, copy=True)
    out[..., 0], out[..., 1] = np.exp(out[..., 0]), np.exp(out[..., 1])
    if law.uses_tokens:
        out[..., 3] = np.exp(out[..., 3])
    return out


@attrs.define(frozen=True)
class Fit:
    """A law fitted to points, with the refits of its bootstrap."""

    law: Law
    points: Points
    theta: Array
    huber_loss: float
    n_starts: int
    #: log-space parameters of each bootstrap refit that converged, one a row
    draws: Array
    resamples: int

    @property
    def failed_resamples(self) -> int:
        """Bootstrap draws whose refit did not converge (left out of the intervals)."""
        return self.resamples - len(self.draws)

    def parameters(self) -> dict[str, Estimate]:
        """Each parameter, natural scale, with its interval."""
        value, draws = _natural(self.law, self.theta), _natural(self.law, self.draws)
        return {name: _estimate(value[i], draws[:, i])
                for i, name in enumerate(self.law.parameters)}  # fmt: skip

    def predict(self, n: Array | float, d: Array | float) -> Array:
        """The fitted loss at ``(n, d)``."""
        n, d = np.broadcast_arrays(np.atleast_1d(n).astype(float), np.atleast_1d(d).astype(float))
        return np.exp(log_loss(self.theta, self.law, n, d))

    def predict_with_interval(self, n: float, d: float) -> Estimate:
        """The fitted loss at one point, with its bootstrap interval."""
        low, high = self.band(np.array([n]), np.array([d]))
        return Estimate(float(self.predict(n, d)[0]), float(low[0]), float(high[0]))

    def band(self, n: Array, d: Array) -> tuple[Array, Array]:
        """The bootstrap interval of the fitted curve at each ``(n, d)``: (low, high)."""
        n, d = np.broadcast_arrays(np.asarray(n, dtype=float), np.asarray(d, dtype=float))
        curves = np.exp(log_loss(self.draws, self.law, n, d))  # one row per refit
        low, high = np.percentile(curves, [50 * (1 - LEVEL), 50 * (1 + LEVEL)], axis=0)
        return low, high

    def allocation(self, flops: float) -> dict[str, Estimate] | None:
        """The compute-optimal ``N``, ``D`` and loss for a budget of ``C = 6ND`` FLOPs.

        Minimising ``A / N^alpha + B / D^beta`` under ``N D = C / 6`` gives
        ``N = G (C/6)^(beta / (alpha + beta))`` and ``D = (C/6) / N``, with
        ``G = (alpha A / (beta B))^(1 / (alpha + beta))``. None for ``L(N)``, which does
        not model ``D``.
        """
        if not self.law.uses_tokens:
            return None

        def optimum(theta: Array) -> tuple[float, float, float]:
            _, a, alpha, b, beta = theta
            g = np.exp((np.log(alpha) + a - np.log(beta) - b) / (alpha + beta))
            n = g * (flops / 6) ** (beta / (alpha + beta))
            d = flops / 6 / n
            return n, d, float(np.exp(log_loss(theta, self.law, np.array([n]), np.array([d])))[0])

        value = optimum(self.theta)
        draws = np.array([optimum(t) for t in self.draws])
        return {key: _estimate(value[i], draws[:, i]) for i, key in enumerate(("N", "D", "L"))}


def fit_law(law: Law, points: Points, *, resamples: int = 200, seed: int = 0) -> Fit:
    """Fit ``law`` to ``points``, then refit ``resamples`` bootstrap draws of them.

    Raises :class:`FitError` when the points are too few for the law's parameters or the
    fit does not converge. A draw with fewer distinct points than parameters is drawn
    again; a draw whose refit does not converge is left out (``Fit.failed_resamples``).
    """
    needed = len(law.parameters)
    if points.distinct(law) < needed:
        raise FitError(
            f"{points.distinct(law)} distinct point(s) for the {needed} parameters of "
            f"{law.formula}; at least {needed} are needed: (N, D, L) = {points.describe()}"
        )
    grid = start_grid(law)
    found = best_fit(law, points, grid, OPTIMISED_STARTS)
    why = "no start reached a finite loss" if found is None else out_of_range(law, found[0])
    if found is None or why:
        raise FitError(
            f"the fit of {law.formula} did not converge ({why}); (N, D, L) = {points.describe()}"
        )
    theta, loss = found
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        index = rng.integers(0, len(points), len(points))
        while points.take(index).distinct(law) < needed:
            index = rng.integers(0, len(points), len(points))
        refit = best_fit(law, points.take(index), grid, REFIT_STARTS, extra=[theta])
        if refit is not None and not out_of_range(law, refit[0]):
            draws.append(refit[0])
    if len(draws) < 2:
        raise FitError(
            f"the fit of {law.formula} converged on the points but on {len(draws)} of "
            f"{resamples} bootstrap draws: no interval; (N, D, L) = {points.describe()}"
        )
    return Fit(law, points, theta, loss, OPTIMISED_STARTS, np.array(draws), resamples)
