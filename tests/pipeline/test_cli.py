"""The `pairgan` console script as a user meets it."""

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import STAGES, build_parser, requested_stage, stage_module

PROJECT = Path(__file__).resolve().parents[2]


def pairgan(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_top_level_help_lists_every_stage_with_its_summary():
    result = pairgan("--help")
    assert result.returncode == 0
    listed = " ".join(result.stdout.split())  # argparse wraps the summaries
    for name, summary in STAGES.items():
        assert name in result.stdout and " ".join(summary.split()) in listed, (name, result.stdout)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_has_help_and_its_summary_is_its_modules(stage, capsys):
    assert STAGES[stage] == stage_module(stage).__doc__.strip().splitlines()[0]
    # the parser the console script builds, in this process (the help above runs the script itself)
    with pytest.raises(SystemExit) as exited:
        build_parser(stage).parse_args([stage, "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert f"usage: pairgan {stage}" in shown and "--params-dir" in shown
    assert "placeholder" not in shown.lower()


def test_only_the_stage_that_runs_is_imported_and_params_errors_come_without_torch(tmp_path):
    # `pairgan --help`, `pairgan prepare`, and the stages that train or score with a missing
    # params folder, answer without importing torch (seconds of CPU); a stage's module is
    # imported when that stage runs.
    probe = (
        "import json, sys\nfrom pipelines.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'pipelines'))))\n"
    )

    def imported(*argv: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=PROJECT, timeout=120)
        return json.loads(done.stdout.strip().splitlines()[-1])

    common = ["pipelines", "pipelines.cli", "pipelines.environment", "pipelines.exit_status"]
    assert imported("--help") == common
    assert imported("prepare", "--params-dir", str(tmp_path / "none")) == sorted([*common, "pipelines.prepare"])
    for stage in ("train", "tune"):
        expected = sorted([*common, "pipelines.ray_connection", f"pipelines.{stage}"])
        assert imported(stage, "--params-dir", str(tmp_path / "none")) == expected, stage
    for stage in ("evaluate", "register"):
        assert imported(stage, "--params-dir", str(tmp_path / "none")) == sorted([*common, f"pipelines.{stage}"]), stage
    # and a stage that gets past its params does load it: the probe sees torch when it is there
    predicted = imported("predict", "--model", str(tmp_path / "none.pt"), "--input", str(tmp_path), "--output", str(tmp_path / "out"))
    assert "torch" in predicted and "pipelines.predict" in predicted


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
    assert build_parser(requested_stage(argv)).parse_args(argv).verbose is verbose
