"""Search methods: grid, random and bayes (Optuna's TPE sampler).

A method is asked for the parameter set of suggestion number ``index`` (0, 1, 2, ... in
the order the server hands them out) given the sweep's trials so far; it answers a nested
parameter dict, or None when it has nothing left (only grid ever runs out). Methods hold
no state of their own: the server keeps the trials in its database, so any replica can
answer and a restart loses nothing.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .config import Param, SweepConfig


@dataclass(frozen=True)
class Trial:
    """One earlier suggestion: its parameters and, once its run ended, the metric value."""

    params: dict[str, Any]
    value: float | None = None
    done: bool = False


class SearchMethod(Protocol):
    """What the server asks for the next parameter set."""

    def suggest(self, index: int, trials: Sequence[Trial]) -> dict[str, Any] | None:
        """Parameters for suggestion ``index``; None when the search is exhausted."""


def _get(params: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = params
    for key in path:
        node = node[key]
    return node


def _quantize(x: float, q: float) -> float | int:
    value = round(x / q) * q
    if float(q).is_integer() and isinstance(q, int):
        return int(value)
    return value


def grid_values(p: Param) -> list[Any]:
    """The values grid search enumerates for one parameter."""
    if p.distribution == "constant":
        return [p.value]
    if p.distribution == "categorical":
        return list(p.values)
    if p.distribution == "int_uniform":
        return list(range(int(p.min), int(p.max) + 1))
    if p.distribution == "q_uniform":
        count = math.floor((p.max - p.min) / p.q + 1e-9) + 1
        ints = all(isinstance(v, int) for v in (p.min, p.max, p.q))
        return [int(p.min + i * p.q) if ints else p.min + i * p.q for i in range(count)]
    raise ValueError(f"parameters.{p.name}: grid cannot enumerate {p.distribution}")


def sample(p: Param, rng: random.Random) -> Any:
    """One value of parameter ``p`` drawn as W&B's random search draws it."""
    d = p.distribution
    if d == "constant":
        return p.value
    if d == "categorical":
        if p.probabilities is not None:
            return rng.choices(p.values, weights=p.probabilities)[0]
        return rng.choice(p.values)
    if d == "int_uniform":
        return rng.randint(int(p.min), int(p.max))
    if d in ("uniform", "q_uniform"):
        x = rng.uniform(p.min, p.max)
    elif d in ("log_uniform", "q_log_uniform"):
        x = math.exp(rng.uniform(p.min, p.max))
    elif d in ("log_uniform_values", "q_log_uniform_values"):
        x = math.exp(rng.uniform(math.log(p.min), math.log(p.max)))
    elif d == "inv_log_uniform":
        x = 1.0 / math.exp(rng.uniform(p.min, p.max))
    elif d == "inv_log_uniform_values":
        x = 1.0 / math.exp(rng.uniform(math.log(1.0 / p.max), math.log(1.0 / p.min)))
    elif d in ("normal", "q_normal"):
        x = rng.gauss(p.mu, p.sigma)
    elif d in ("log_normal", "q_log_normal"):
        x = math.exp(rng.gauss(p.mu, p.sigma))
    elif d in ("beta", "q_beta"):
        x = rng.betavariate(p.a, p.b)
    else:  # pragma: no cover - config validation rejects unknown distributions
        raise ValueError(f"unknown distribution {d!r}")
    return _quantize(x, p.q) if d.startswith("q_") else x


class GridSearch:
    """Every combination once, in order (the last parameter varies fastest)."""

    def __init__(self, config: SweepConfig) -> None:
        self.config = config
        self.axes = [grid_values(p) for p in config.params]
        self.size = math.prod(len(axis) for axis in self.axes)

    def suggest(self, index: int, trials: Sequence[Trial]) -> dict[str, Any] | None:
        if index >= self.size:
            return None
        leaves: dict[tuple[str, ...], Any] = {}
        rest = index
        for p, axis in zip(reversed(self.config.params), reversed(self.axes), strict=True):
            rest, i = divmod(rest, len(axis))
            leaves[p.path] = axis[i]
        ordered = {p.path: leaves[p.path] for p in self.config.params}
        return self.config.assemble(ordered)


class RandomSearch:
    """Independent draws; suggestion ``index`` of a sweep is reproducible from its seed."""

    def __init__(self, config: SweepConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed

    def suggest(self, index: int, trials: Sequence[Trial]) -> dict[str, Any] | None:
        rng = random.Random(f"{self.seed}:{index}")
        return self.config.assemble({p.path: sample(p, rng) for p in self.config.params})


class BayesSearch:
    """Optuna's TPE sampler, rebuilt from the trials each time (the server is stateless).

    Finished trials with a metric value teach the sampler; trials still running are
    told to it as running, so concurrent agents get different suggestions.
    """

    def __init__(self, config: SweepConfig, seed: int = 0) -> None:
        if config.metric is None:
            raise ValueError("bayes search needs a metric")
        self.config = config
        self.seed = seed
        self._fixed = {p.path: p.value for p in config.params if p.distribution == "constant"}
        self._free = [p for p in config.params if p.distribution != "constant"]

    def _distribution(self, p: Param) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        d = p.distribution
        if d == "categorical":
            return CategoricalDistribution(list(range(len(p.values))))
        if d == "int_uniform":
            return IntDistribution(int(p.min), int(p.max))
        if d in ("uniform", "q_uniform"):
            return FloatDistribution(float(p.min), float(p.max))
        if d in ("log_uniform", "q_log_uniform", "inv_log_uniform"):
            low, high = math.exp(p.min), math.exp(p.max)
            if d == "inv_log_uniform":
                low, high = 1.0 / high, 1.0 / low
            return FloatDistribution(low, high, log=True)
        if d in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values"):
            return FloatDistribution(float(p.min), float(p.max), log=True)
        if d in ("normal", "q_normal"):
            return FloatDistribution(p.mu - 4 * p.sigma, p.mu + 4 * p.sigma)
        if d in ("log_normal", "q_log_normal"):
            return FloatDistribution(
                math.exp(p.mu - 4 * p.sigma), math.exp(p.mu + 4 * p.sigma), log=True
            )
        return FloatDistribution(0.0, 1.0)  # beta, q_beta

    def _internal(self, p: Param, value: Any, dist: Any) -> Any:
        """The sampler's value for a user value (None when it does not fit the space)."""
        if p.distribution == "categorical":
            for i, v in enumerate(p.values):
                if v == value and type(v) is type(value):
                    return i
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        clamped = min(max(value, dist.low), dist.high)
        return int(clamped) if p.distribution == "int_uniform" else float(clamped)

    def _external(self, p: Param, value: Any) -> Any:
        if p.distribution == "categorical":
            return p.values[int(value)]
        if p.distribution.startswith("q_"):
            return _quantize(value, p.q)
        return value

    def suggest(self, index: int, trials: Sequence[Trial]) -> dict[str, Any] | None:
        import optuna
        from optuna.trial import TrialState, create_trial

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        dists = {p.name: self._distribution(p) for p in self._free}
        assert self.config.metric is not None
        direction: Literal["minimize", "maximize"] = (
            "maximize" if self.config.metric.goal == "maximize" else "minimize"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant_liar is flagged experimental
            sampler = optuna.samplers.TPESampler(
                seed=(self.seed * 1_000_003 + index) % (2**32), constant_liar=True
            )
        study = optuna.create_study(direction=direction, sampler=sampler)
        for t in trials:
            params: dict[str, Any] = {}
            for p in self._free:
                try:
                    internal = self._internal(p, _get(t.params, p.path), dists[p.name])
                except (KeyError, TypeError):
                    internal = None
                if internal is None:
                    break
                params[p.name] = internal
            else:
                if t.done and t.value is not None and math.isfinite(t.value):
                    state, value = TrialState.COMPLETE, t.value
                elif t.done:
                    state, value = TrialState.FAIL, None
                else:
                    state, value = TrialState.RUNNING, None
                study.add_trial(
                    create_trial(params=params, distributions=dists, value=value, state=state)
                )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = study.ask(dists)
        leaves = dict(self._fixed)
        for p in self._free:
            leaves[p.path] = self._external(p, trial.params[p.name])
        return self.config.assemble({p.path: leaves[p.path] for p in self.config.params})


def make_search(config: SweepConfig, seed: int = 0) -> SearchMethod:
    """The search method the config names."""
    if config.method == "grid":
        return GridSearch(config)
    if config.method == "random":
        return RandomSearch(config, seed)
    return BayesSearch(config, seed)
