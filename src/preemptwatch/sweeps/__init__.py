"""Sweeps: W&B-format sweep files, the search methods, and the command each run gets."""

from __future__ import annotations

from .command import build_command
from .config import Metric, Param, SweepConfig, SweepConfigError, load_config, parse_config
from .search import SearchMethod, Trial, make_search

__all__ = [
    "Metric",
    "Param",
    "SearchMethod",
    "SweepConfig",
    "SweepConfigError",
    "Trial",
    "build_command",
    "load_config",
    "make_search",
    "parse_config",
]
