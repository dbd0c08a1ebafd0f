"""sweeps/dvc.yaml: the sweep is versioned by DVC off the default pipeline, and reruns when what it runs changes."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from components.tuning.report import BEST_FILE, PLOT_FILE, RESULTS_FILE, SUMMARY_FILE

ROOT = Path(__file__).resolve().parents[2]


def sweep_stage() -> dict:
    return yaml.safe_load((ROOT / "sweeps/dvc.yaml").read_text())["stages"]["tune"]


def modules_the_sweep_runs() -> set[str]:
    """Project files imported by the stage, its trials and their training workers (in a fresh interpreter)."""
    script = (
        "import json, sys\n"
        "import pipelines.tune, components.tuning.sweep, components.tuning.trial, components.tuning.tracking\n"
        "import components.tuning.report, components.training.driver, components.training.worker\n"
        "import components.training.loop, components.data.torch_loader, components.data.dali_loader\n"
        "files = [m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)]\n"
        "print(json.dumps(files))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300, check=True)
    files = {Path(name).resolve() for name in json.loads(result.stdout.splitlines()[-1])}
    return {
        path.relative_to(ROOT).as_posix() for path in files
        if path.is_relative_to(ROOT) and path.parts[len(ROOT.parts)] in ("components", "pipelines")
        and not (path.name == "__init__.py" and path.stat().st_size == 0)
    }


def test_the_sweep_stage_depends_on_everything_it_runs():
    deps = [str(dep).rstrip("/") for dep in sweep_stage()["deps"]]
    # The library files whose code shapes the results; of the stage modules, tune and the train
    # module whose size check it shares (the rest only parse arguments and set exit statuses).
    missing = sorted(
        path for path in modules_the_sweep_runs()
        if path.startswith("components/") and path != "components/__init__.py"  # the package docstring
        # pipelines/environment.py turns pickle loading off through the registry's loader: a
        # safety switch, not something that shapes a sweep's results (nor the train stage's)
        and not path.startswith("components/registry/")
        and not any(path == dep or path.startswith(dep + "/") for dep in deps)
    )
    assert not missing, f"sweeps/dvc.yaml's tune stage runs but does not depend on: {missing}"
    assert {"data/prepared", "pipelines/tune.py", "pipelines/train.py"} <= set(deps)


def test_the_sweep_is_off_the_default_pipeline_and_declares_its_files():
    stage = sweep_stage()
    assert stage["wdir"] == ".." and stage["cmd"].startswith("pairgan tune ") and "--out reports/tune" in stage["cmd"]
    assert "tune" not in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = {next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage["params"]}
    assert {"params/tune.yaml", "params/model.yaml", "params/train.yaml", "params/data.yaml"} <= params
    declared = {next(iter(entry)) for entry in stage["outs"]}
    assert declared == {f"reports/tune/{name}" for name in (BEST_FILE, SUMMARY_FILE, RESULTS_FILE, PLOT_FILE)}
    # not metrics or plots: DVC would report them missing in the default pipeline's
    # `dvc metrics show` and `dvc plots show` until a sweep has run
    assert "metrics" not in stage and "plots" not in stage
