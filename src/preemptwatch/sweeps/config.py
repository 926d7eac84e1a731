"""Parse and validate sweep files in W&B's sweep configuration format.

Everything W&B's format says about parameters holds here: ``value``, ``values`` (with
``probabilities``), a ``distribution`` with ``min``/``max``/``mu``/``sigma``/``q``/``a``/``b``,
defaults inferred from the keys given (integer bounds give ``int_uniform``, other bounds
``uniform``, ``mu``/``sigma`` ``normal``), and nested ``parameters``. Ours on top:
``max_requeues`` (default 10) and ``requeue_crashed`` (default false).

A bad file raises `SweepConfigError`, whose ``problems`` name each field path and reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")

#: Distribution -> (required keys, optional keys with their defaults).
DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "constant": (("value",), {}),
    "categorical": (("values",), {"probabilities": None}),
    "int_uniform": (("min", "max"), {}),
    "uniform": (("min", "max"), {}),
    "q_uniform": (("min", "max"), {"q": 1.0}),
    "log_uniform": (("min", "max"), {}),
    "log_uniform_values": (("min", "max"), {}),
    "q_log_uniform": (("min", "max"), {"q": 1.0}),
    "q_log_uniform_values": (("min", "max"), {"q": 1.0}),
    "inv_log_uniform": (("min", "max"), {}),
    "inv_log_uniform_values": (("min", "max"), {}),
    "normal": ((), {"mu": 0.0, "sigma": 1.0}),
    "q_normal": ((), {"mu": 0.0, "sigma": 1.0, "q": 1.0}),
    "log_normal": ((), {"mu": 0.0, "sigma": 1.0}),
    "q_log_normal": ((), {"mu": 0.0, "sigma": 1.0, "q": 1.0}),
    "beta": ((), {"a": 1.0, "b": 1.0}),
    "q_beta": ((), {"a": 1.0, "b": 1.0, "q": 1.0}),
}

#: Distributions whose ``min``/``max`` are actual values, so they must be positive.
_POSITIVE_BOUNDS = frozenset(
    {"log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values"}
)
#: Keys a parameter may hold besides ``distribution`` and ``parameters``.
_NODE_KEYS = frozenset({"distribution", "parameters"})
_SPEC_KEYS = frozenset(
    {"value", "values", "probabilities", "min", "max", "mu", "sigma", "q", "a", "b"}
)

#: Top-level keys of W&B's format that we accept and act on.
_KNOWN_KEYS = frozenset(
    {
        "program",
        "command",
        "method",
        "metric",
        "parameters",
        "run_cap",
        "name",
        "description",
        "project",
        "entity",
        "max_requeues",
        "requeue_crashed",
    }
)
#: W&B keys accepted for compatibility but without effect here (reported as ignored).
IGNORED_KEYS = frozenset({"early_terminate", "controller", "job", "image_uri", "launch"})

DEFAULT_COMMAND = ("${env}", "${interpreter}", "${program}", "${args}")


class SweepConfigError(ValueError):
    """A sweep file that cannot be used; ``problems`` is a list of ``(path, reason)``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(
            "; ".join(f"{path}: {reason}" if path else reason for path, reason in problems)
        )


@dataclass(frozen=True)
class Param:
    """One leaf parameter. ``path`` locates it in the nested config (``("opt", "lr")``)."""

    path: tuple[str, ...]
    distribution: str
    value: Any = None
    values: tuple[Any, ...] = ()
    probabilities: tuple[float, ...] | None = None
    min: float = 0.0
    max: float = 0.0
    mu: float = 0.0
    sigma: float = 1.0
    q: float = 1.0
    a: float = 1.0
    b: float = 1.0

    @property
    def name(self) -> str:
        """Dotted path, as in error messages: ``parameters.opt.lr``."""
        return ".".join(self.path)


@dataclass(frozen=True)
class Metric:
    """The metric a sweep optimises: the last logged value of ``name`` in a run."""

    name: str
    goal: str = "minimize"


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep file."""

    method: str
    params: tuple[Param, ...]
    metric: Metric | None = None
    program: str | None = None
    command: tuple[str, ...] = DEFAULT_COMMAND
    run_cap: int | None = None
    max_requeues: int = 10
    requeue_crashed: bool = False
    name: str | None = None
    ignored: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def assemble(self, leaves: dict[tuple[str, ...], Any]) -> dict[str, Any]:
        """Nest leaf values (keyed by path) into the config dict a run receives."""
        out: dict[str, Any] = {}
        for path, value in leaves.items():
            node = out
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    """Collects problems while walking a raw config."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def bad(self, path: str, reason: str) -> None:
        self.problems.append((path, reason))

    def params(self, raw: Any, path: tuple[str, ...], out: list[Param]) -> None:
        where = ".".join(("parameters", *path)) if path else "parameters"
        if not isinstance(raw, dict) or not raw:
            self.bad(where, "must be a non-empty mapping of parameter names to specs")
            return
        for name, spec in raw.items():
            if not isinstance(name, str) or not name:
                self.bad(where, f"parameter names must be non-empty strings, got {name!r}")
                continue
            self.param(spec, (*path, name), out)

    def param(self, spec: Any, path: tuple[str, ...], out: list[Param]) -> None:
        where = ".".join(("parameters", *path))
        start = len(self.problems)
        if not isinstance(spec, dict):
            self.bad(
                where, "must be a mapping such as {value: 1}, {values: [...]} or {min: 0, max: 1}"
            )
            return
        if "parameters" in spec:
            extra = sorted(set(spec) - {"parameters"})
            if extra:
                self.bad(where, f"a nested parameter holds only 'parameters', not {extra}")
            self.params(spec["parameters"], path, out)
            return
        unknown = sorted(str(k) for k in set(spec) - _SPEC_KEYS - {"distribution"})
        if unknown:
            self.bad(
                f"{where}.{unknown[0]}",
                f"unknown field; expected some of {sorted(_SPEC_KEYS | _NODE_KEYS)}",
            )
            return
        dist = spec.get("distribution")
        if dist is None:
            dist = self.infer(spec, where)
            if dist is None:
                return
        elif dist not in DISTRIBUTIONS:
            self.bad(
                f"{where}.distribution",
                f"unknown distribution {dist!r}; expected one of {sorted(DISTRIBUTIONS)}",
            )
            return
        required, optional = DISTRIBUTIONS[dist]
        allowed = {*required, *optional}
        for key in spec:
            if key != "distribution" and key not in allowed:
                self.bad(
                    f"{where}.{key}",
                    f"not used by distribution {dist!r} (it takes {sorted(allowed)})",
                )
        for key in required:
            if key not in spec:
                self.bad(f"{where}.{key}", f"required by distribution {dist!r}")
        if len(self.problems) > start:
            return
        values: dict[str, Any] = {
            **optional,
            **{k: v for k, v in spec.items() if k != "distribution"},
        }
        before = len(self.problems)
        for key in ("min", "max", "mu", "sigma", "q", "a", "b"):
            if key in values and not _is_number(values[key]):
                self.bad(f"{where}.{key}", f"must be a number, got {values[key]!r}")
        if len(self.problems) > before:
            return
        self.check_values(dist, values, where)
        if len(self.problems) > before:
            return
        kwargs: dict[str, Any] = {
            k: v
            for k, v in values.items()
            if k in ("value", "min", "max", "mu", "sigma", "q", "a", "b")
        }
        if "values" in values:
            kwargs["values"] = tuple(values["values"])
        if values.get("probabilities") is not None:
            kwargs["probabilities"] = tuple(float(p) for p in values["probabilities"])
        out.append(Param(path=path, distribution=dist, **kwargs))

    def infer(self, spec: dict[str, Any], where: str) -> str | None:
        """The distribution W&B would infer from the keys present."""
        if "value" in spec:
            return "constant"
        if "values" in spec:
            return "categorical"
        if "min" in spec or "max" in spec:
            if "min" not in spec or "max" not in spec:
                missing = "max" if "min" in spec else "min"
                self.bad(f"{where}.{missing}", "required when the other bound is given")
                return None
            if _is_int(spec["min"]) and _is_int(spec["max"]):
                return "q_uniform" if "q" in spec else "int_uniform"
            return "q_uniform" if "q" in spec else "uniform"
        if "mu" in spec or "sigma" in spec:
            return "q_normal" if "q" in spec else "normal"
        if "a" in spec or "b" in spec:
            return "q_beta" if "q" in spec else "beta"
        self.bad(
            where, "needs one of 'value', 'values', 'min'/'max', 'distribution' or 'parameters'"
        )
        return None

    def check_values(self, dist: str, v: dict[str, Any], where: str) -> None:
        if dist == "categorical":
            values = v["values"]
            if not isinstance(values, list) or not values:
                self.bad(f"{where}.values", "must be a non-empty list")
                return
            probs = v.get("probabilities")
            if probs is not None:
                if not isinstance(probs, list) or len(probs) != len(values):
                    self.bad(
                        f"{where}.probabilities",
                        f"must be a list of {len(values)} numbers, one per value",
                    )
                elif not all(_is_number(p) and p >= 0 for p in probs):
                    self.bad(f"{where}.probabilities", "must be non-negative numbers")
                elif not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                    self.bad(f"{where}.probabilities", f"must sum to 1, not {sum(probs)}")
            return
        if dist == "int_uniform" and not (_is_int(v["min"]) and _is_int(v["max"])):
            key = "min" if not _is_int(v["min"]) else "max"
            self.bad(f"{where}.{key}", f"must be an integer for int_uniform, got {v[key]!r}")
            return
        if "min" in v and "max" in v and dist != "constant":
            if v["min"] > v["max"] or (v["min"] == v["max"] and dist != "int_uniform"):
                self.bad(f"{where}.max", f"must be greater than min ({v['max']!r} <= {v['min']!r})")
                return
            if dist in _POSITIVE_BOUNDS and v["min"] <= 0:
                self.bad(f"{where}.min", f"must be positive for {dist} (log of the value is taken)")
        if "sigma" in v and v["sigma"] <= 0:
            self.bad(f"{where}.sigma", "must be positive")
        if "q" in v and v["q"] <= 0:
            self.bad(f"{where}.q", "must be positive")
        for key in ("a", "b"):
            if key in v and v[key] <= 0:
                self.bad(f"{where}.{key}", "must be positive")


def parse_config(raw: Any) -> SweepConfig:
    """Validate a sweep config already loaded from YAML/JSON into Python objects."""
    check = _Checker()
    if not isinstance(raw, dict):
        raise SweepConfigError([("", "a sweep file must be a mapping (method, parameters, ...)")])
    for key in raw:
        if key not in _KNOWN_KEYS and key not in IGNORED_KEYS:
            check.bad(str(key), f"unknown field; expected some of {sorted(_KNOWN_KEYS)}")
    method = raw.get("method")
    if method is None:
        check.bad("method", "required: one of grid, random, bayes")
    elif method not in METHODS:
        check.bad("method", f"must be one of grid, random, bayes, not {method!r}")
    metric = _metric(raw.get("metric"), check)
    if method == "bayes" and metric is None and "metric" not in raw:
        check.bad("metric", "required for method bayes (name and goal of the metric to optimise)")
    params: list[Param] = []
    if "parameters" not in raw:
        check.bad("parameters", "required")
    else:
        check.params(raw["parameters"], (), params)
    program = raw.get("program")
    if program is not None and (not isinstance(program, str) or not program):
        check.bad("program", "must be a non-empty string (the script to run)")
    command = raw.get("command", list(DEFAULT_COMMAND))
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(c, (str, int, float)) for c in command)
    ):
        check.bad("command", "must be a non-empty list of strings")
        command = list(DEFAULT_COMMAND)
    command = [str(c) for c in command]
    if any("${program}" in c for c in command) and program is None:
        check.bad("program", "required: the command uses ${program}")
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not _is_int(run_cap) or run_cap < 1):
        check.bad("run_cap", f"must be a positive integer, got {run_cap!r}")
    max_requeues = raw.get("max_requeues", 10)
    if not _is_int(max_requeues) or max_requeues < 0:
        check.bad("max_requeues", f"must be a non-negative integer, got {max_requeues!r}")
    requeue_crashed = raw.get("requeue_crashed", False)
    if not isinstance(requeue_crashed, bool):
        check.bad("requeue_crashed", f"must be true or false, got {requeue_crashed!r}")
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        check.bad("name", "must be a string")
    if method == "grid":
        for p in params:
            if p.distribution not in GRID_DISTRIBUTIONS:
                check.bad(
                    f"parameters.{p.name}",
                    "method grid needs discrete values (value, values, int_uniform or q_uniform), "
                    f"not {p.distribution}",
                )
    if check.problems:
        raise SweepConfigError(check.problems)
    return SweepConfig(
        method=str(method),
        params=tuple(params),
        metric=metric,
        program=program,
        command=tuple(command),
        run_cap=run_cap,
        max_requeues=int(max_requeues),
        requeue_crashed=bool(requeue_crashed),
        name=name,
        ignored=tuple(sorted(k for k in raw if k in IGNORED_KEYS)),
        raw=raw,
    )


GRID_DISTRIBUTIONS = frozenset({"constant", "categorical", "int_uniform", "q_uniform"})


def _metric(raw: Any, check: _Checker) -> Metric | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        check.bad("metric", "must be a mapping with 'name' and 'goal'")
        return None
    for key in raw:
        if key not in ("name", "goal", "target"):
            check.bad(f"metric.{key}", "unknown field; expected name, goal, target")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        check.bad("metric.name", "required: the name of a logged value")
        return None
    goal = raw.get("goal", "minimize")
    if goal not in GOALS:
        check.bad("metric.goal", f"must be minimize or maximize, not {goal!r}")
        return None
    target = raw.get("target")
    if target is not None and not _is_number(target):
        check.bad("metric.target", "must be a number")
    return Metric(name=name, goal=goal)


def load_config(text: str) -> SweepConfig:
    """Parse and validate a sweep file's text (YAML, or JSON which is YAML too)."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml comes with the server extra
        raise SweepConfigError(
            [("", "reading sweep files needs PyYAML: pip install 'preemptwatch[server]'")]
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SweepConfigError(
            [("", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}")]
        ) from None
    return parse_config(raw)
