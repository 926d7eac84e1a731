"""Sweep files in W&B's format: what is accepted, what is inferred, and every error kind."""

from __future__ import annotations

import pytest

from preemptwatch.sweeps import SweepConfigError, load_config, parse_config

BASE = {"program": "train.py", "method": "random"}


def params_of(text: str) -> dict[str, str]:
    return {p.name: p.distribution for p in load_config(text).params}


def test_full_wandb_file_parses_with_defaults() -> None:
    config = load_config(
        """
program: train.py
method: bayes
metric:
  name: val_loss
  goal: minimize
parameters:
  lr: {distribution: log_uniform_values, min: 0.0001, max: 0.1}
  batch_size: {values: [16, 32, 64], probabilities: [0.2, 0.3, 0.5]}
  epochs: {value: 5}
  optimizer:
    parameters:
      momentum: {min: 0.5, max: 0.99}
      decay: {distribution: q_normal, mu: 0.01, sigma: 0.001, q: 0.001}
run_cap: 30
early_terminate: {type: hyperband, min_iter: 3}
"""
    )
    assert config.method == "bayes"
    assert config.metric is not None and config.metric.name == "val_loss"
    assert config.run_cap == 30
    assert config.max_requeues == 10 and config.requeue_crashed is False
    assert config.command == ("${env}", "${interpreter}", "${program}", "${args}")
    assert config.ignored == ("early_terminate",)
    by_name = {p.name: p for p in config.params}
    assert by_name["optimizer.momentum"].path == ("optimizer", "momentum")
    assert by_name["batch_size"].probabilities == (0.2, 0.3, 0.5)
    assert by_name["optimizer.decay"].q == 0.001


def test_distribution_inference_follows_wandb() -> None:
    inferred = params_of(
        """
method: random
program: train.py
parameters:
  a: {value: 1}
  b: {values: [x, y]}
  c: {min: 1, max: 10}
  d: {min: 0.1, max: 1}
  e: {min: 0, max: 10, q: 2}
  f: {mu: 0, sigma: 2}
  g: {a: 2, b: 3}
"""
    )
    assert inferred == {
        "a": "constant",
        "b": "categorical",
        "c": "int_uniform",
        "d": "uniform",
        "e": "q_uniform",
        "f": "normal",
        "g": "beta",
    }


def test_distribution_defaults_filled_in() -> None:
    config = parse_config({**BASE, "parameters": {"x": {"distribution": "normal"}}})
    (p,) = config.params
    assert (p.mu, p.sigma) == (0.0, 1.0)
    config = parse_config(
        {**BASE, "parameters": {"x": {"distribution": "q_uniform", "min": 0, "max": 4}}}
    )
    assert config.params[0].q == 1.0


def test_ours_max_requeues_and_requeue_crashed() -> None:
    config = parse_config(
        {**BASE, "parameters": {"x": {"value": 1}}, "max_requeues": 3, "requeue_crashed": True}
    )
    assert (config.max_requeues, config.requeue_crashed) == (3, True)


def test_custom_command_kept() -> None:
    config = parse_config(
        {
            **BASE,
            "command": ["${env}", "python3", "${program}", "${args_no_hyphens}"],
            "parameters": {"x": {"value": 1}},
        }
    )
    assert config.command[-1] == "${args_no_hyphens}"


def test_command_without_program_needs_none() -> None:
    config = parse_config(
        {"method": "grid", "command": ["echo", "${args}"], "parameters": {"x": {"values": [1]}}}
    )
    assert config.program is None


@pytest.mark.parametrize(
    ("raw", "path", "reason"),
    [
        ([1, 2], "", "must be a mapping"),
        ({"parameters": {"x": {"value": 1}}}, "method", "required"),
        (
            {**BASE, "method": "hyperopt", "parameters": {"x": {"value": 1}}},
            "method",
            "must be one of",
        ),
        ({**BASE}, "parameters", "required"),
        ({**BASE, "parameters": {}}, "parameters", "non-empty mapping"),
        (
            {**BASE, "parameters": {"x": {"value": 1}}, "paramters": {}},
            "paramters",
            "unknown field",
        ),
        ({**BASE, "parameters": {"x": 3}}, "parameters.x", "must be a mapping"),
        ({**BASE, "parameters": {"x": {}}}, "parameters.x", "needs one of"),
        ({**BASE, "parameters": {"x": {"vals": [1]}}}, "parameters.x.vals", "unknown field"),
        (
            {**BASE, "parameters": {"x": {"distribution": "gaussian"}}},
            "parameters.x.distribution",
            "unknown distribution",
        ),
        (
            {**BASE, "parameters": {"x": {"distribution": "uniform", "min": 0}}},
            "parameters.x.max",
            "required by distribution",
        ),
        (
            {**BASE, "parameters": {"x": {"distribution": "uniform", "min": 0, "max": 1, "mu": 0}}},
            "parameters.x.mu",
            "not used by",
        ),
        ({**BASE, "parameters": {"x": {"min": 0}}}, "parameters.x.max", "required when"),
        (
            {**BASE, "parameters": {"x": {"min": "a", "max": 1}}},
            "parameters.x.min",
            "must be a number",
        ),
        (
            {**BASE, "parameters": {"x": {"min": 2, "max": 1}}},
            "parameters.x.max",
            "greater than min",
        ),
        (
            {**BASE, "parameters": {"x": {"distribution": "int_uniform", "min": 0.5, "max": 3}}},
            "parameters.x.min",
            "integer",
        ),
        (
            {
                **BASE,
                "parameters": {"x": {"distribution": "log_uniform_values", "min": 0, "max": 1}},
            },
            "parameters.x.min",
            "positive",
        ),
        (
            {**BASE, "parameters": {"x": {"distribution": "normal", "sigma": 0}}},
            "parameters.x.sigma",
            "positive",
        ),
        (
            {**BASE, "parameters": {"x": {"min": 0, "max": 1, "q": -1}}},
            "parameters.x.q",
            "positive",
        ),
        (
            {**BASE, "parameters": {"x": {"distribution": "beta", "a": 0}}},
            "parameters.x.a",
            "positive",
        ),
        ({**BASE, "parameters": {"x": {"values": []}}}, "parameters.x.values", "non-empty list"),
        (
            {**BASE, "parameters": {"x": {"values": [1, 2], "probabilities": [1.0]}}},
            "parameters.x.probabilities",
            "one per value",
        ),
        (
            {**BASE, "parameters": {"x": {"values": [1, 2], "probabilities": [0.5, 0.6]}}},
            "parameters.x.probabilities",
            "sum to 1",
        ),
        (
            {**BASE, "parameters": {"x": {"values": [1, 2], "probabilities": [-0.5, 1.5]}}},
            "parameters.x.probabilities",
            "non-negative",
        ),
        (
            {**BASE, "parameters": {"o": {"parameters": {"y": {"min": 3, "max": 1}}}}},
            "parameters.o.y.max",
            "greater than min",
        ),
        (
            {**BASE, "parameters": {"o": {"parameters": {"y": {"value": 1}}, "value": 2}}},
            "parameters.o",
            "only 'parameters'",
        ),
        ({**BASE, "parameters": {"o": {"parameters": []}}}, "parameters.o", "non-empty mapping"),
        (
            {**BASE, "method": "bayes", "parameters": {"x": {"min": 0, "max": 1}}},
            "metric",
            "required for method bayes",
        ),
        (
            {**BASE, "metric": {"goal": "minimize"}, "parameters": {"x": {"value": 1}}},
            "metric.name",
            "required",
        ),
        (
            {**BASE, "metric": {"name": "l", "goal": "min"}, "parameters": {"x": {"value": 1}}},
            "metric.goal",
            "minimize or maximize",
        ),
        (
            {
                **BASE,
                "metric": {"name": "l", "gaol": "minimize"},
                "parameters": {"x": {"value": 1}},
            },
            "metric.gaol",
            "unknown field",
        ),
        ({**BASE, "metric": "loss", "parameters": {"x": {"value": 1}}}, "metric", "mapping"),
        (
            {**BASE, "method": "grid", "parameters": {"x": {"min": 0.0, "max": 1.0}}},
            "parameters.x",
            "grid needs discrete",
        ),
        ({"method": "grid", "parameters": {"x": {"value": 1}}}, "program", "uses ${program}"),
        ({**BASE, "program": "", "parameters": {"x": {"value": 1}}}, "program", "non-empty string"),
        (
            {**BASE, "command": "python train.py", "parameters": {"x": {"value": 1}}},
            "command",
            "list of strings",
        ),
        ({**BASE, "run_cap": 0, "parameters": {"x": {"value": 1}}}, "run_cap", "positive integer"),
        (
            {**BASE, "max_requeues": -1, "parameters": {"x": {"value": 1}}},
            "max_requeues",
            "non-negative",
        ),
        (
            {**BASE, "requeue_crashed": "yes", "parameters": {"x": {"value": 1}}},
            "requeue_crashed",
            "true or false",
        ),
    ],
)
def test_every_error_names_the_field_and_reason(raw: object, path: str, reason: str) -> None:
    with pytest.raises(SweepConfigError) as err:
        parse_config(raw)
    assert any(p == path and reason in r for p, r in err.value.problems), err.value.problems
    if path:
        assert f"{path}: " in str(err.value)


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(SweepConfigError) as err:
        parse_config({"method": "nope", "parameters": {"a": {"min": 2, "max": 1}, "b": {}}})
    paths = {p for p, _ in err.value.problems}
    assert {"method", "parameters.a.max", "parameters.b"} <= paths


def test_yaml_syntax_error_has_position() -> None:
    with pytest.raises(SweepConfigError, match=r"not valid YAML at line 2"):
        load_config("method: grid\nparameters: {x: [1, 2}\n")
