"""Reading a params YAML file into a validated pydantic model.

Every stage goes through `load_params`, so a bad value fails the same way everywhere:
before any work starts, with the file, the dotted key and the reason.
"""

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

ParamsModel = TypeVar("ParamsModel", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every params model: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", strict=False, validate_default=True, frozen=True)


class ParamsError(ValueError):
    """A params file could not be read or failed validation.

    `problems` holds one `(key, reason)` pair per failure; the message lists them all,
    each prefixed by the file, so a user can fix every mistake in one pass.
    """

    def __init__(self, path: Path | str, problems: list[tuple[str, str]]):
        self.path = str(path)
        self.problems = problems
        lines = [f"{self.path}: {key}: {reason}" if key else f"{self.path}: {reason}" for key, reason in problems]
        super().__init__("invalid params\n" + "\n".join(lines))


# Tags pydantic puts in an error's location for the branches of a union (`bool | "auto"`):
# they are not keys a user can find in the YAML file.
_UNION_BRANCH_TAGS = {"bool", "int", "float", "str", "none", "list", "dict", "tagged-union"}


def _dotted(location: tuple) -> str:
    # Keep what a user can find in the YAML file (names and list indices).
    parts = []
    for item in location:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and (item.startswith("function-") or "[" in item or item in _UNION_BRANCH_TAGS):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def read_yaml_mapping(path: Path | str) -> dict:
    """Safe-load a YAML file that must hold a mapping; errors are `ParamsError`s naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(path, [("", "file not found")]) from None
    except OSError as error:
        raise ParamsError(path, [("", f"cannot be read: {error.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(error, "problem", None) or str(error)
        raise ParamsError(path, [("", f"not valid YAML{where}: {reason}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(path, [("", f"must hold a mapping of keys, found {type(data).__name__}")])
    return data


def validate_params(data: dict, model: type[ParamsModel], path: Path | str, context: dict | None = None) -> ParamsModel:
    """Validate already-loaded data, reporting errors against `path`.

    `context` reaches validators as `info.context`; stages pass {"base_dir": ...} so that
    relative source paths are checked against the directory the user runs from.
    """
    try:
        return model.model_validate(data, context=context)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False):
            reason = item["msg"]
            if item["type"] == "extra_forbidden":
                reason = "unknown key (check the spelling; see the documented keys in this file's defaults)"
            elif reason.startswith("Value error, "):
                reason = reason.removeprefix("Value error, ")
            problems.append((_dotted(item["loc"]), reason))
        # A value that fits no branch of a union fails once per branch: one line per key.
        merged: dict[str, list[str]] = {}
        for key, reason in problems:
            if reason not in merged.setdefault(key, []):
                merged[key].append(reason)
        raise ParamsError(path, [(key, "; or ".join(reasons)) for key, reasons in merged.items()]) from None


def load_params(path: Path | str, model: type[ParamsModel], context: dict | None = None) -> ParamsModel:
    """Load and validate one params file."""
    return validate_params(read_yaml_mapping(path), model, path, context)
