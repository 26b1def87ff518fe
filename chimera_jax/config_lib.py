"""Config plumbing shared by every file in configs/: variant strings, locking, validation, resolved configs.

A config file exposes ``get_config(arg: str | None) -> ml_collections.ConfigDict``; ``arg`` is the part after the
colon in ``--config=configs/lm.py:arch=dense,size=tiny`` and is a comma-separated list of ``key=value`` pairs.
"""
from __future__ import annotations

import ast
import json
import os
from typing import Any, Mapping

import ml_collections


def parse_variant(arg: str | None, allowed: Mapping[str, Any]) -> dict[str, Any]:
    """'arch=dense,size=tiny' -> {'arch': 'dense', 'size': 'tiny'}, defaults from ``allowed``.

    ``allowed`` maps each key to its default; a key that is not there is refused with the list of valid keys.
    Values are parsed as Python literals where possible ('4' -> 4), else kept as strings.
    """
    out = dict(allowed)
    if not arg:
        return out
    for part in arg.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"config variant {part!r} is not key=value; valid keys: {sorted(allowed)}")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in allowed:
            raise ValueError(f"unknown config variant key {key!r}; valid keys: {sorted(allowed)}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {sorted(choices)}")


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks the config: setting a field that does not exist raises, naming the field and the valid ones.

    ml_collections already refuses a value of the wrong type for an existing field.
    """
    config.lock()
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Sets dotted fields ('model.num_layers': 4) with a clear error for unknown fields or wrong types."""
    for dotted, value in overrides.items():
        node = config
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:i]) or "<top level>"
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise ValueError(f"unknown config field {dotted!r}: {where} has no field {part!r}; "
                                 f"valid fields there: {valid}")
            if i < len(parts) - 1:
                node = node[part]
        try:
            node[parts[-1]] = value
        except TypeError as e:
            raise TypeError(f"config field {dotted!r}: {e}") from None


def to_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json_best_effort(indent=2, sort_keys=True)


def resolved_config_path(workdir: str) -> str:
    return os.path.join(workdir, "config.json")


def save_resolved(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the resolved config atomically: generate / evaluate / export rebuild the model from it."""
    path = resolved_config_path(workdir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_json(config))
    os.replace(tmp, path)


def load_resolved(workdir: str) -> ml_collections.ConfigDict:
    path = resolved_config_path(workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a chimera_jax workdir (made by train.py)?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
