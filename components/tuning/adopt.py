"""Writing a sweep's best params into params/*.yaml without touching anything else in the files.

The files are the project's documentation as much as its configuration: their comments say
what each key means. A YAML library that loads and dumps a file loses or moves them (and
rewrites `null`, flow lists and number formats), so this edits the text instead: PyYAML's
composer gives every value node its exact span in the file, and only that span is replaced by
the new value in YAML flow style (`0.62`, `[1, 2, 4]`, `{t_min: 5, t_max: 500}`). A key whose
parent is `null` (Diffusion-GAN switched off) gets its parent replaced by a flow mapping; a key
that is absent is added as a new line under its parent, indented like its siblings.

After editing, the new text is parsed again and must equal the old content with exactly the
requested changes; anything else is a bug and nothing is written.
"""

import copy
import shlex
from collections.abc import Mapping
from typing import Any

import yaml

from components.config.loading import ParamsYAMLLoader
from components.tuning.space import set_dotted


def load_text(text: str) -> Any:
    """YAML text read as the params loader reads it (1e-4 is a float, as for every stage)."""
    return yaml.load(text, Loader=ParamsYAMLLoader)


class AdoptError(ValueError):
    """A value cannot be written into the params file; names the file and the key."""


def flow(value: Any) -> str:
    """`value` as one line of YAML flow style."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, sort_keys=False).strip()
    # A plain scalar is dumped as a document: "0.62\n..."
    return text.removesuffix("...").strip()


def _find(mapping: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    for key_node, value_node in mapping.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return key_node, value_node
    return None


def _last_scalar(node: yaml.Node) -> yaml.Node:
    # The node that ends a block collection's text (its end mark may lie past trailing comments).
    while isinstance(node, yaml.MappingNode | yaml.SequenceNode) and node.value and not node.flow_style:
        last = node.value[-1]
        node = last[1] if isinstance(node, yaml.MappingNode) else last
    return node


def _nested(parts: list[str], value: Any) -> Any:
    for part in reversed(parts):
        value = {part: value}
    return value


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _replace(text: str, node: yaml.Node, replacement: str) -> str:
    # A block collection's end mark lies at the next key (past the line break and any comment
    # lines); it ends where its last value does.
    start, end = node.start_mark.index, _last_scalar(node).end_mark.index
    after = text[end:]
    # Keep a comment on the same line at its column: `norm: batch      # instance | batch`.
    padding = len(after) - len(after.lstrip(" "))
    if "\n" not in text[start:end] and after[padding : padding + 1] == "#":
        padding = max(1, padding + (end - start) - len(replacement))
        after = " " * padding + after.lstrip(" ")
    return text[:start] + replacement + after


def set_value(text: str, key: str, value: Any, file: str) -> str:
    """`text` with the value at dotted `key` replaced by `value`, everything else byte for byte."""
    root = yaml.compose(text, Loader=ParamsYAMLLoader)
    if root is None:
        return text + f"{key.split('.')[0]}: {flow(_nested(key.split('.')[1:], value))}\n"
    parts = key.split(".")
    node = root
    for depth, part in enumerate(parts):
        walked = ".".join(parts[: depth + 1])
        if not isinstance(node, yaml.MappingNode):
            raise AdoptError(f"{file}: {key}: {'.'.join(parts[:depth])} holds a value, not a mapping of keys")
        if node.flow_style:
            # {a: 1, b: 2} on one line: rewrite that mapping as a whole.
            content = load_text(text[node.start_mark.index : node.end_mark.index]) or {}
            set_dotted(content, ".".join(parts[depth:]), value)
            return _replace(text, node, flow(content))
        found = _find(node, part)
        rest = parts[depth + 1 :]
        if found is None:
            if not node.value:
                raise AdoptError(f"{file}: {key}: cannot add {part} to an empty mapping")
            first_key = node.value[0][0]
            indent = " " * first_key.start_mark.column
            end = _last_scalar(node.value[-1][1]).end_mark.index
            line_end = text.find("\n", end)
            line_end = len(text) if line_end < 0 else line_end + 1
            prefix = "" if text[:line_end].endswith("\n") else "\n"
            line = f"{indent}{part}: {flow(_nested(rest, value))}\n"
            return text[:line_end] + prefix + line + text[line_end:]
        value_node = found[1]
        if not rest:
            if isinstance(value_node, yaml.MappingNode) and not value_node.flow_style and isinstance(value, Mapping):
                raise AdoptError(f"{file}: {walked}: write its keys one by one, not the whole mapping")
            return _replace(text, value_node, flow(value))
        if _is_null(value_node):
            return _replace(text, value_node, flow(_nested(rest, value)))
        node = value_node
    raise AdoptError(f"{file}: {key}: not found")


def apply_values(text: str, values: Mapping[str, Any], file: str) -> str:
    """Set every dotted key of `values` in the YAML `text`, checking the result parses to exactly that."""
    expected = copy.deepcopy(load_text(text) or {})
    for key, value in values.items():
        try:
            set_dotted(expected, key, value)
        except KeyError as error:
            raise AdoptError(f"{file}: {key}: cannot be set: {error.args[0]}") from None
        text = set_value(text, key, value, file)
    if load_text(text) != expected:
        raise AdoptError(f"{file}: the edited file does not read back as the requested values; nothing was written")
    return text


def _has_key(content: Any, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(content, dict) or part not in content:
            return False
        content = content[part]
    return True


def dvc_exp_command(document: Mapping[str, Mapping[str, Any]], params_dir: str, current: Mapping[str, Any]) -> str:
    """The `dvc exp run -S` line that sets the same values.

    current: each file's present content. A key the file does not hold yet (its parent is
    null) needs Hydra's `++` (add or override), which DVC's -S parser requires. DVC then
    rewrites the files through its own YAML library (a `null` becomes empty).
    """
    arguments = ["dvc", "exp", "run"]
    for file, values in document.items():
        for key, value in values.items():
            add = "" if _has_key(current.get(file), key) else "++"
            arguments += ["-S", f"{params_dir.rstrip('/')}/{file}:{add}{key}={flow(value)}"]
    return shlex.join(arguments)
