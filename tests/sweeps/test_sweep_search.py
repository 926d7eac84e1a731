"""Search methods on their own: grid exhaustion, random draws in bounds, bayes improving."""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

import pytest

from preemptwatch.sweeps import Trial, build_command, make_search, parse_config
from preemptwatch.sweeps.search import GridSearch, sample


def config(method: str, params: dict[str, Any], **extra: Any) -> Any:
    return parse_config({"program": "train.py", "method": method, "parameters": params, **extra})


def test_grid_enumerates_every_combination_once_then_stops() -> None:
    cfg = config(
        "grid",
        {
            "a": {"values": [1, 2, 3]},
            "b": {"distribution": "int_uniform", "min": 0, "max": 1},
            "c": {"value": "x"},
            "o": {"parameters": {"q": {"distribution": "q_uniform", "min": 0, "max": 1, "q": 0.5}}},
        },
    )
    search = make_search(cfg)
    assert isinstance(search, GridSearch) and search.size == 3 * 2 * 1 * 3
    seen = [search.suggest(i, []) for i in range(search.size)]
    keys = {(s["a"], s["b"], s["c"], s["o"]["q"]) for s in seen if s is not None}
    assert len(keys) == 18
    assert {k[3] for k in keys} == {0.0, 0.5, 1.0}
    assert search.suggest(search.size, []) is None
    assert search.suggest(search.size + 5, []) is None


def test_grid_order_is_cartesian_last_fastest() -> None:
    search = make_search(config("grid", {"a": {"values": [1, 2]}, "b": {"values": ["x", "y"]}}))
    assert [search.suggest(i, []) for i in range(4)] == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]


BOUNDED = {
    "u": ({"distribution": "uniform", "min": -2.0, "max": 3.0}, -2.0, 3.0),
    "i": ({"distribution": "int_uniform", "min": 2, "max": 5}, 2, 5),
    "q": ({"distribution": "q_uniform", "min": 0, "max": 10, "q": 2}, 0, 10),
    "lv": ({"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1}, 1e-4, 1e-1),
    "l": ({"distribution": "log_uniform", "min": -3, "max": 0}, math.exp(-3), 1.0),
    "ilv": ({"distribution": "inv_log_uniform_values", "min": 0.01, "max": 1.0}, 0.01, 1.0),
    "b": ({"distribution": "beta", "a": 2, "b": 5}, 0.0, 1.0),
}


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_random_draws_stay_within_bounds(name: str) -> None:
    spec, low, high = BOUNDED[name]
    search = make_search(config("random", {"x": spec}), seed=7)
    values = [search.suggest(i, [])["x"] for i in range(400)]  # type: ignore[index]
    assert all(low - 1e-12 <= v <= high + 1e-12 for v in values)
    assert len(set(values)) > 3  # it really varies


def test_random_int_and_quantised_values() -> None:
    search = make_search(
        config(
            "random",
            {
                "i": {"min": 1, "max": 3},
                "q": {"distribution": "q_uniform", "min": 0, "max": 10, "q": 2},
                "qf": {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25},
            },
        ),
        seed=3,
    )
    draws = [search.suggest(i, []) for i in range(300)]
    assert {d["i"] for d in draws if d} == {1, 2, 3}
    assert all(isinstance(d["i"], int) for d in draws if d)
    assert {d["q"] for d in draws if d} <= {0, 2, 4, 6, 8, 10}
    assert {d["qf"] for d in draws if d} <= {0.0, 0.25, 0.5, 0.75, 1.0}


def test_random_distributions_have_their_shape() -> None:
    rng = random.Random(1)
    cfg = config(
        "random",
        {
            "n": {"distribution": "normal", "mu": 5.0, "sigma": 2.0},
            "ln": {"distribution": "log_normal", "mu": 0.0, "sigma": 0.5},
            "lv": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1.0},
            "c": {"values": ["a", "b"], "probabilities": [0.9, 0.1]},
        },
    )
    by = {p.name: p for p in cfg.params}
    normal = [sample(by["n"], rng) for _ in range(4000)]
    assert abs(statistics.mean(normal) - 5.0) < 0.15
    assert abs(statistics.stdev(normal) - 2.0) < 0.15
    lognormal = [sample(by["ln"], rng) for _ in range(4000)]
    assert min(lognormal) > 0 and abs(statistics.median(lognormal) - 1.0) < 0.05
    logs = [math.log10(sample(by["lv"], rng)) for _ in range(4000)]
    # log-uniform: each decade gets about a quarter of the draws
    assert abs(sum(1 for v in logs if v < -3) / 4000 - 0.25) < 0.04
    cats = [sample(by["c"], rng) for _ in range(4000)]
    assert abs(cats.count("a") / 4000 - 0.9) < 0.03


def test_random_is_reproducible_per_sweep_seed_and_index() -> None:
    cfg = config("random", {"x": {"min": 0.0, "max": 1.0}})
    a, b = make_search(cfg, seed=1), make_search(cfg, seed=2)
    assert a.suggest(4, []) == make_search(cfg, seed=1).suggest(4, [])
    assert a.suggest(4, []) != a.suggest(5, [])
    assert a.suggest(4, []) != b.suggest(4, [])


def objective(params: dict[str, Any]) -> float:
    return (params["x"] - 0.7) ** 2 + (params["y"] + 1.3) ** 2 + (0 if params["k"] == "good" else 1)


def run_search(method: str, seed: int, n: int = 40) -> list[float]:
    cfg = config(
        method,
        {
            "x": {"min": -5.0, "max": 5.0},
            "y": {"min": -5.0, "max": 5.0},
            "k": {"values": ["bad", "good", "worse"]},
            "fixed": {"value": 1},
        },
        metric={"name": "loss", "goal": "minimize"},
    )
    search = make_search(cfg, seed=seed)
    trials: list[Trial] = []
    for i in range(n):
        params = search.suggest(i, trials)
        assert params is not None and params["fixed"] == 1
        trials.append(Trial(params=params, value=objective(params), done=True))
    return [t.value for t in trials if t.value is not None]


def test_bayes_improves_on_random_for_a_toy_objective() -> None:
    bayes_late, random_late = [], []
    for seed in range(3):
        bayes = run_search("bayes", seed)
        rand = run_search("random", seed)
        bayes_late.append(statistics.mean(bayes[-15:]))
        random_late.append(statistics.mean(rand[-15:]))
        # TPE learns: its late suggestions beat its own random start-up phase
        assert statistics.mean(bayes[-15:]) < statistics.mean(bayes[:10])
    assert statistics.mean(bayes_late) < 0.5 * statistics.mean(random_late)


def test_bayes_maximize_and_running_trials() -> None:
    cfg = config(
        "bayes",
        {"x": {"min": 0.0, "max": 1.0}},
        metric={"name": "acc", "goal": "maximize"},
    )
    search = make_search(cfg, seed=0)
    trials = [Trial({"x": i / 20}, value=i / 20, done=True) for i in range(20)]
    trials.append(Trial({"x": 0.5}, done=False))  # still running
    trials.append(Trial({"x": 0.9}, done=True))  # failed: no value
    picks = [search.suggest(30 + i, trials)["x"] for i in range(10)]  # type: ignore[index]
    assert statistics.mean(picks) > 0.6


def test_bayes_ignores_trials_outside_the_space() -> None:
    cfg = config("bayes", {"k": {"values": ["a", "b"]}}, metric={"name": "m", "goal": "minimize"})
    search = make_search(cfg)
    assert search.suggest(0, [Trial({"k": "zzz"}, value=1.0, done=True), Trial({}, done=True)])[
        "k"
    ] in ("a", "b")  # type: ignore[index]


def test_command_macros_as_wandb() -> None:
    params = {"lr": 0.1, "flag": True, "off": False, "opt": {"m": 0.9}}
    template = ["${env}", "${interpreter}", "${program}", "${args}"]
    assert build_command(template, params, program="t.py", env={}) == [
        "/usr/bin/env",
        "python",
        "t.py",
        "--lr=0.1",
        "--flag=True",
        "--off=False",
        "--opt={'m': 0.9}",
    ]
    assert build_command(["x", "${args_no_hyphens}"], params, program=None)[1:] == [
        "lr=0.1",
        "flag=True",
        "off=False",
        "opt={'m': 0.9}",
    ]
    assert build_command(["${args_no_boolean_flags}"], params, program=None) == [
        "--lr=0.1",
        "--flag",
        "--opt={'m': 0.9}",
    ]
    assert build_command(["${args_no_equals}"], {"a": 1}, program=None) == ["--a", "1"]
    assert build_command(["${args_override_hydra}"], {"a": 1}, program=None) == ["++a=1"]
    assert build_command(["${args_append_hydra}"], {"a": 1}, program=None) == ["+a=1"]
    assert build_command(["${args_json}"], {"a": 1}, program=None) == ['{"a": 1}']
    assert build_command(
        ["run", "--dir=${envvar:DATA}/x", "${envvar:NOPE}"], {}, program=None, env={"DATA": "/d"}
    ) == ["run", "--dir=/d/x", "NOPE"]
    assert build_command(
        ["${interpreter}"], {}, program=None, env={"PREEMPTWATCH_INTERPRETER": "python3.11"}
    ) == ["python3.11"]


def test_args_json_file_written(tmp_path: Any) -> None:
    path = tmp_path / "sub" / "args.json"
    cmd = build_command(["cat", "${args_json_file}"], {"a": [1, 2]}, program=None, json_file=path)
    assert cmd == ["cat", str(path)]
    assert path.read_text() == '{"a": [1, 2]}'
    with pytest.raises(ValueError, match="args_json_file"):
        build_command(["${args_json_file}"], {}, program=None)
