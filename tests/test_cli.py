"""The `pairgan` console script as a user meets it."""

import subprocess
import sys

import pytest

from pipelines.cli import STAGES


def pairgan(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_top_level_help_lists_every_stage():
    result = pairgan("--help")
    assert result.returncode == 0
    for name in STAGES:
        assert name in result.stdout


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_has_help(stage):
    result = pairgan(stage, "--help")
    assert result.returncode == 0, result.stderr
    assert "--params-dir" in result.stdout
    assert "placeholder" not in result.stdout.lower()


def test_unknown_stage_is_a_usage_error():
    result = pairgan("fly")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
