"""Reading a params YAML file into a validated pydantic model.

Every stage goes through `load_params`, so a bad value fails the same way everywhere:
before any work starts, with the file, the dotted key and the reason. The file is the only
place a value lives: the models declare types and constraints, no defaults, so every key
must be given. Values are not coerced: "1", 1.0 and "yes" are not the integer or boolean
they look like (YAML's own booleans, true/false/yes/no/on/off unquoted, are booleans).
"""

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

ParamsModel = TypeVar("ParamsModel", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every params model: every key required, unknown keys are errors, values are not coerced.

    Tuples are the exception to strict typing: YAML has lists only, so a tuple field takes a
    list (its items stay strict); declare one as `Annotated[tuple[...], Strict(False)]`.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @classmethod
    def unknown_key_reason(cls, location: tuple) -> str:
        """Why the key at `location` (pydantic's error location) is refused: the keys its section accepts."""
        section = section_model(cls, location[:-1])
        where = _dotted(location[:-1]) or "the file"
        if section is None:
            return "unknown key (check the spelling)"
        return f"unknown key (check the spelling); {where} accepts {', '.join(section.model_fields)}"

    @classmethod
    def missing_key_reason(cls, location: tuple) -> str:
        """Where to find a key that is not given (every key is required)."""
        return "every key must be given (the shipped params file lists each one with its comment)"


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


def _is_tag(item: object) -> bool:
    return isinstance(item, str) and (item.startswith("function-") or "[" in item or item in _UNION_BRANCH_TAGS)


def location_keys(location: tuple) -> tuple[str, ...]:
    """The mapping keys of an error location, without list indices and union tags."""
    return tuple(item for item in location if isinstance(item, str) and not _is_tag(item))


def _dotted(location: tuple) -> str:
    # Keep what a user can find in the YAML file (names and list indices).
    parts = []
    for item in location:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not _is_tag(item):
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The params models an annotation can hold (through Annotated, unions, Optional, lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = get_origin(annotation)
    if origin is Annotated:
        return _models_in(get_args(annotation)[0])
    if origin is Literal or origin is None:
        return []
    return [model for argument in get_args(annotation) for model in _models_in(argument)]


def _branch_value(model: type[BaseModel]) -> str | None:
    """The value of a union branch's `name` literal (the method name), if it has one."""
    field = model.model_fields.get("name")
    if field is not None and get_origin(field.annotation) is Literal:
        return str(get_args(field.annotation)[0])
    return None


def section_model(model: type[BaseModel], location: tuple) -> type[BaseModel] | None:
    """The params model holding the keys at `location`; a union branch is picked by its tag `[name]`."""
    candidates: list[type[BaseModel]] = [model]
    for item in location:
        if isinstance(item, str) and item.startswith("[") and item.endswith("]"):
            candidates = [branch for branch in candidates if _branch_value(branch) == item[1:-1]]
        elif isinstance(item, int) or _is_tag(item):
            continue
        else:
            fields = [branch.model_fields[item] for branch in candidates if item in branch.model_fields]
            candidates = [found for field in fields for found in _models_in(field.annotation)]
    return candidates[0] if len(candidates) == 1 else None


# --- YAML ---------------------------------------------------------------------------

_MERGE_TAG = "tag:yaml.org,2002:merge"


class ParamsYAMLLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only, no object tags) that also reads 1e-4 as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (1.0e-4): without this, `lr: 1e-4`
    would be the string "1e-4", refused by the strict schema though every YAML 1.2 tool
    (DVC's `-S` among them) writes floats that way.
    """


ParamsYAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _duplicated_keys(node: yaml.Node, path: str = "", seen: set[int] | None = None) -> list[tuple[str, str]]:
    """Keys given twice in one mapping, anywhere in the document (YAML would keep the last silently)."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias to a node already checked (or to itself)
        return []
    seen.add(id(node))
    problems = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = path
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                key = f"{path}.{key_node.value}" if path else key_node.value
                line = key_node.start_mark.line + 1
                if key_node.value in first_line:
                    problems.append((key, f"given twice, at lines {first_line[key_node.value]} and {line}: "
                                          "keep one (YAML would silently use the last)"))
                else:
                    first_line[key_node.value] = line
            problems += _duplicated_keys(value_node, key, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += _duplicated_keys(item, f"{path}[{index}]", seen)
    return problems


def read_params_text(path: Path | str) -> str:
    """A params file's text; a missing or unreadable file is a `ParamsError` naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(path, [("", "file not found")]) from None
    except OSError as error:
        raise ParamsError(path, [("", f"cannot be read: {error.strerror}")]) from None


def read_yaml_mapping(path: Path | str) -> dict:
    """Safe-load a YAML file that must hold a non-empty mapping; errors are `ParamsError`s naming the file."""
    return parse_yaml_mapping(read_params_text(path), path)


def parse_yaml_mapping(text: str, path: Path | str) -> dict:
    """Safe-load YAML text that must hold a non-empty mapping without duplicated keys (the
    content of the params file `path`); errors are `ParamsError`s naming it."""
    loader = ParamsYAMLLoader(text)
    try:
        node = loader.get_single_node()
        duplicated = _duplicated_keys(node) if node is not None else []
        if duplicated:
            raise ParamsError(path, duplicated)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(error, "problem", None) or str(error)
        raise ParamsError(path, [("", f"not valid YAML{where}: {reason}")]) from None
    finally:
        loader.dispose()
    if data is None:
        raise ParamsError(path, [("", "is empty: every key must be given (the shipped file lists each one)")])
    if not isinstance(data, dict):
        raise ParamsError(path, [("", f"must hold a mapping of keys, found {type(data).__name__}")])
    return data


def with_overrides(base: Mapping, overrides: Mapping) -> dict:
    """`base` with `overrides` merged in, mapping into mapping; any other value replaces the base's."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = with_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate_params(data: dict, model: type[ParamsModel], path: Path | str, context: dict | None = None) -> ParamsModel:
    """Validate already-loaded data, reporting errors against `path`.

    `context` reaches validators as `info.context`; stages pass {"base_dir": ...} so that
    relative source paths are checked against the directory the user runs from.
    """
    try:
        return model.model_validate(data, context=context)
    except ValidationError as error:
        explains = issubclass(model, StrictModel)
        problems = []
        missing: dict[tuple[str, str], list[str]] = {}  # (section, reason) -> keys missing from it
        for item in error.errors(include_url=False):
            reason = item["msg"]
            if item["type"] == "missing" and explains:
                section = (_dotted(item["loc"][:-1]), model.missing_key_reason(item["loc"]))
                if section not in missing:
                    problems.append(section)  # a placeholder, keeps the order of the errors
                missing.setdefault(section, []).append(str(item["loc"][-1]))
                continue
            if item["type"] == "extra_forbidden" and explains:
                reason = model.unknown_key_reason(item["loc"])
            elif reason.startswith("Value error, "):
                reason = reason.removeprefix("Value error, ")
            problems.append((_dotted(item["loc"]), reason))
        # Keys missing from one section are one problem (a whole block left out is one line).
        for index, problem in enumerate(problems):
            if problem in missing:
                (section, reason), keys = problem, missing[problem]
                if len(keys) == 1:
                    problems[index] = (f"{section}.{keys[0]}" if section else keys[0], f"missing: {reason}")
                else:
                    problems[index] = (section, f"missing keys {', '.join(keys)}: {reason}")
        # A value that fits no branch of a union fails once per branch: one line per key.
        merged: dict[str, list[str]] = {}
        for key, reason in problems:
            if reason not in merged.setdefault(key, []):
                merged[key].append(reason)
        raise ParamsError(path, [(key, "; or ".join(reasons)) for key, reasons in merged.items()]) from None


def load_params(path: Path | str, model: type[ParamsModel], context: dict | None = None) -> ParamsModel:
    """Load and validate one params file."""
    return validate_params(read_yaml_mapping(path), model, path, context)
