"""dvc.yaml: every stage depends on all the code it runs, so a code change reruns the stages it affects."""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (imports for annotations only)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (node for orelse in child.orelse for node in _runtime_nodes_and_self(orelse))
            continue
        yield from _runtime_nodes_and_self(child)


def _runtime_nodes_and_self(node: ast.AST):
    yield node
    yield from _runtime_nodes(node)


def imported_project_files(module_file: Path, seen: set[Path] | None = None) -> set[Path]:
    """The components/ files `module_file` imports, directly or through other components/ modules."""
    seen = set() if seen is None else seen
    for node in _runtime_nodes(ast.parse(module_file.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if not name.startswith("components"):
                continue
            base = ROOT / Path(*name.split("."))
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file() and candidate not in seen:
                    seen.add(candidate)
                    imported_project_files(candidate, seen)
    return seen


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


# The stages that load a trained generator and score it: their numbers depend on the loaders,
# the networks and the methods as much as on their own modules.
@pytest.mark.parametrize("stage", ["evaluate", "register"])
def test_a_stage_depends_on_every_component_file_it_runs(stage):
    spec = stages()[stage]
    module = ROOT / "pipelines" / f"{stage}.py"
    deps = [str(dep).rstrip("/") for dep in spec["deps"]]
    assert f"pipelines/{stage}.py" in deps
    missing = sorted(
        path.relative_to(ROOT).as_posix()
        for path in imported_project_files(module)
        if path.name != "__init__.py" or path.stat().st_size > 0
        if not any(path.relative_to(ROOT).as_posix() == dep or path.relative_to(ROOT).as_posix().startswith(dep + "/") for dep in deps)
    )
    assert not missing, f"dvc.yaml stage {stage} runs but does not depend on: {missing}"
