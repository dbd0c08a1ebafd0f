"""Nested params as flat dotted keys: {"run": {"scaling": {"num_workers": 2}}} -> {"run.scaling.num_workers": 2}.

The one flattener for MLflow params, checkpoint job records, params differences and reports.
"""

from collections.abc import Mapping
from typing import Any


def flatten(nested: Mapping, prefix: str = "") -> dict[str, Any]:
    """Every leaf of `nested` under its dotted key; lists and other values are leaves."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def changed_keys(before: Mapping, after: Mapping) -> list[str]:
    """Dotted keys whose leaf differs between two nested mappings (a key one side lacks counts)."""
    old, new = flatten(before), flatten(after)
    missing = object()
    return sorted(key for key in old.keys() | new.keys() if old.get(key, missing) != new.get(key, missing))
