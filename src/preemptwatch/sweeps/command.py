"""Turn a sweep's ``command`` template and one run's parameters into an argument list.

Macros, as in W&B: a list item that is exactly ``${env}``, ``${interpreter}``,
``${program}``, ``${args}``, ``${args_no_hyphens}``, ``${args_no_equals}``,
``${args_no_boolean_flags}``, ``${args_json}``, ``${args_json_file}``,
``${args_append_hydra}`` or ``${args_override_hydra}`` is replaced by its values (possibly
several items); ``${envvar:NAME}`` anywhere in an item is replaced by that environment
variable (left as ``NAME`` when unset). ``${interpreter}`` is ``python`` unless
``PREEMPTWATCH_INTERPRETER`` names another.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_ENVVAR = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")


def arg_forms(params: Mapping[str, Any]) -> dict[str, list[str]]:
    """Every argument form of the top-level parameters (nested ones as their dict)."""
    forms: dict[str, list[str]] = {
        "args": [],
        "args_no_hyphens": [],
        "args_no_equals": [],
        "args_no_boolean_flags": [],
        "args_append_hydra": [],
        "args_override_hydra": [],
    }
    for name, value in params.items():
        flag = f"{name}={value}"
        forms["args"].append(f"--{flag}")
        forms["args_no_hyphens"].append(flag)
        forms["args_no_equals"] += [f"--{name}", str(value)]
        forms["args_append_hydra"].append(f"+{flag}")
        forms["args_override_hydra"].append(f"++{flag}")
        if isinstance(value, bool):
            if value:
                forms["args_no_boolean_flags"].append(f"--{name}")
        else:
            forms["args_no_boolean_flags"].append(f"--{flag}")
    forms["args_json"] = [json.dumps(dict(params))]
    return forms


def build_command(
    template: list[str] | tuple[str, ...],
    params: Mapping[str, Any],
    *,
    program: str | None,
    json_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """The argument list for one run; ``json_file`` is written if ``${args_json_file}`` is used."""
    environ = os.environ if env is None else env
    macros = arg_forms(params)
    macros["env"] = ["/usr/bin/env"] if os.name != "nt" else []
    macros["interpreter"] = [environ.get("PREEMPTWATCH_INTERPRETER") or "python"]
    if program is not None:
        macros["program"] = [program]
    if "${args_json_file}" in template:
        if json_file is None:
            raise ValueError("the command uses ${args_json_file} but no file path was given")
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(macros["args_json"][0])
        macros["args_json_file"] = [str(json_file)]
    out: list[str] = []
    for item in template:
        if item.startswith("${") and item.endswith("}") and item[2:-1] in macros:
            out += macros[item[2:-1]]
            continue
        out.append(_ENVVAR.sub(lambda m: environ.get(m.group(1), m.group(1)), item))
    return out
