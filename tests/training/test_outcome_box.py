"""The outcome box (components/training/outcome.py) is a Ray actor of its own on every training
job: its process imports that module, so the module must stay light."""

import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def test_the_outcome_box_process_imports_neither_torch_nor_the_rest_of_the_project():
    listing = ("import json, sys, components.training.outcome; "
               "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'components'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", listing], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["components", "components.training", "components.training.outcome"]
