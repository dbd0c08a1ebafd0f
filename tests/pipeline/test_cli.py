"""The `pairgan` console script as a user meets it."""

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import STAGES, build_parser

PROJECT = Path(__file__).resolve().parents[2]


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
def test_every_stage_has_help(stage, capsys):
    # the parser the console script builds, in this process (the help above runs the script itself)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([stage, "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert f"usage: pairgan {stage}" in shown and "--params-dir" in shown
    assert "placeholder" not in shown.lower()


def test_unknown_stage_is_a_usage_error():
    result = pairgan("fly")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


@pytest.mark.parametrize(("stage", "missing"), [("train", "no manifest"), ("evaluate", "no train report"),
                                                ("register", "no train report")])
def test_stages_reading_the_shards_do_not_need_the_source_folder(tmp_path, stage, missing):
    # A training node or a CI job with restored shards has no source folder: params still
    # validate, and the stage names what it really lacks.
    shutil.copytree(PROJECT / "params", tmp_path / "params")
    assert not (tmp_path / "data/builtin").exists()
    result = pairgan(stage, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert missing in result.stderr and "source.path" not in result.stderr


def test_version_comes_from_the_installed_package():
    result = pairgan("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"pairgan {importlib.metadata.version('pairgan')}"


@pytest.mark.parametrize(("argv", "verbose"), [(["train"], False), (["-v", "train"], True), (["train", "--verbose"], True),
                                               (["--verbose", "evaluate", "-v"], True)])
def test_verbose_is_accepted_before_or_after_the_stage(argv, verbose):
    assert build_parser().parse_args(argv).verbose is verbose
