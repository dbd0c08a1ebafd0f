"""A prepare killed mid-run leaves the last committed data set as it was (or nothing), and the next run completes."""

import os
import subprocess
import sys
from pathlib import Path

from components.data.manifest import load_manifest
from pipelines.cli import main

# Runs the stage's component in a child process whose shard hook SIGKILLs it after N shards:
# no cleanup code runs, as in a real crash or an evicted pod.
KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from components.config import load_params
from components.config.data import DataParams
from components.data.sources import open_source
from components.data.writer import prepare_dataset

params = load_params("params/data.yaml", DataParams, context={"base_dir": Path.cwd()})
written = []

def crash(path):
    written.append(path)
    if len(written) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)

prepare_dataset(params, open_source(params, Path.cwd()), Path("data/prepared"), progress=False, on_shard_written=crash)
"""


def run_killed_after(shards: int, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-c", KILLED_RUN, str(shards)], cwd=cwd, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()


def prepare(out: str = "data/prepared") -> int:
    return main(["prepare", "--params-dir", "params", "--out", out, "--report", "reports/prepare.json", "--no-progress"])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_killed_first_run_leaves_nothing_and_rerun_completes(tmp_path, monkeypatch, write_params):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params")
    run_killed_after(2, tmp_path)
    assert visible(tmp_path / "data") == []  # no data/prepared at all, not a partial one
    assert prepare() == 0
    assert prepare("reference") == 0
    assert snapshot(tmp_path / "data/prepared") == snapshot(tmp_path / "reference")
    assert visible(tmp_path / "data") == ["prepared"]  # the interrupted run's staging is gone


def test_killed_overwrite_keeps_the_previous_data_set(tmp_path, monkeypatch, write_params):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params")
    assert prepare() == 0
    before = snapshot(tmp_path / "data/prepared")
    write_params(tmp_path / "params", jpeg_quality=80)
    run_killed_after(3, tmp_path)
    assert snapshot(tmp_path / "data/prepared") == before
    assert prepare() == 0
    assert load_manifest(tmp_path / "data/prepared").params["jpeg_quality"] == 80


def test_killed_append_keeps_the_committed_part_and_rerun_completes(tmp_path, monkeypatch, write_params):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params", mode="append")
    assert prepare() == 0
    assert prepare("reference") == 0
    before = snapshot(tmp_path / "data/prepared")
    more = {"kind": "builtin", "builtin": {"train_pairs": 24, "val_pairs": 3, "test_pairs": 3}}
    write_params(tmp_path / "params", mode="append", source=more)
    run_killed_after(2, tmp_path)
    assert snapshot(tmp_path / "data/prepared") == before
    assert prepare() == 0
    assert prepare("reference") == 0  # the same append, uninterrupted
    assert snapshot(tmp_path / "data/prepared") == snapshot(tmp_path / "reference")
    assert load_manifest(tmp_path / "data/prepared").split("train").count == 24


def test_next_run_repairs_a_crash_between_commit_steps(tmp_path, monkeypatch, write_params):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params", mode="append")
    assert prepare() == 0
    committed = snapshot(tmp_path / "data/prepared")
    # crash after an append moved a new shard in but before the manifest named it
    (tmp_path / "data/prepared/train/train-000009.tar").write_bytes(b"uncommitted")
    assert prepare() == 0
    assert snapshot(tmp_path / "data/prepared") == committed
    # crash in the middle of an overwrite's folder swap: old set moved aside, new not in yet
    os.replace(tmp_path / "data/prepared", tmp_path / "data/.prepared.old")
    assert prepare() == 0
    assert snapshot(tmp_path / "data/prepared") == committed
    assert visible(tmp_path / "data") == ["prepared"] and sorted(os.listdir(tmp_path / "data")) == ["prepared"]


def test_overwrite_refuses_a_folder_that_is_not_a_data_set(tmp_path, monkeypatch, write_params, caplog):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params")
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/notes.txt").write_text("mine")
    assert prepare() == 1
    assert "refusing to write into data/prepared" in caplog.text
    assert (tmp_path / "data/prepared/notes.txt").read_text() == "mine"
