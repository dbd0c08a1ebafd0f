"""bench/gpu_check.py in --cpu mode: the GPU check's own code, small, as the GPU machine runs it
(without Ray, MLflow, DALI, WebDataset or DVC: a sitecustomize makes importing them fail)."""

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
CHECK = REPOSITORY / "bench" / "gpu_check.py"
NOT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "nvidia.dali", "webdataset", "dvc")
BLOCKER = '''
import importlib.abc
import sys

BLOCKED = {blocked!r}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == blocked or name.startswith(blocked + ".") for blocked in BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
'''


def check_command(tmp_path: Path, *arguments: str, blocked: tuple[str, ...] = NOT_ON_THE_GPU_MACHINE):
    """The command and environment of a --cpu check in which `blocked` modules cannot be imported."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=blocked))
    path = [str(site), str(REPOSITORY), *filter(None, [os.environ.get("PYTHONPATH")])]
    # TMPDIR: a killed run's scratch folder stays inside the test's folder
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    return [sys.executable, str(CHECK), "--cpu", "--out", str(tmp_path / "out"), *arguments], environment


def run_check(tmp_path: Path, *arguments: str, blocked: tuple[str, ...] = NOT_ON_THE_GPU_MACHINE):
    command, environment = check_command(tmp_path, *arguments, blocked=blocked)
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
    report_path = tmp_path / "out" / "gpu_check.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return completed, report


def items(report: dict, section: str) -> dict[str, dict]:
    return {item["name"]: item for item in report["sections"][section]["items"]}


@pytest.mark.slow
def test_the_cpu_mode_runs_every_section_without_ray_mlflow_dali_webdataset_dvc(tmp_path):
    completed, report = run_check(tmp_path)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert list(report["sections"]) == ["environment", "decode", "throughput_pix2pix", "throughput_atme",
                                        "cuda_tests", "correctness"]
    assert all(section["status"] == "ok" for section in report["sections"].values())
    environment = report["sections"]["environment"]["items"][0]
    assert not any(environment["importable"][name] for name in NOT_ON_THE_GPU_MACHINE)

    decode = items(report, "decode")
    loader_rate = decode["nvjpeg loader, batch 8"]
    assert loader_rate["pairs_per_s"] > 0 and loader_rate["pairs"] == 8  # one epoch of 12 pairs: one full batch

    for method in ("pix2pix", "atme"):
        rows = items(report, f"throughput_{method}")
        for name in ("fp32 eager", "all on", "shipped defaults (auto)"):
            row = rows[f"{method} resident {name}"]
            assert row["status"] == "ok" and row["images_per_s"] > 0 and row["losses_finite"], row
        assert rows[f"{method} resident fp32 eager"]["train_gflop_per_image"] > 0
        assert rows[f"{method} resident all on"]["switches"]["autocast"] == "bf16"
        assert rows[f"{method} resident all on + activation checkpointing"]["switches"]["activation_checkpointing"]
    loader_row = items(report, "throughput_pix2pix")["pix2pix loader all on"]
    assert loader_row["mode"] == "loader" and 0 < loader_row["fraction_of_resident"]

    correctness = items(report, "correctness")
    exported = correctness["pix2pix fp32 eager + export"]
    assert exported["export_ok"] and exported["export_max_abs_difference"] <= 2e-3
    for method in ("atme", "diffusion_gan", "ddgan"):
        assert correctness[f"{method} fp32 eager"]["losses_finite"]
        for variant in ("bf16", "channels_last", "all on"):
            compared = correctness[f"{method} {variant}"]
            assert compared["status"] == "ok" and max(compared["max_relative_deviation"].values()) <= compared["tolerance"]
    assert correctness["atme sdpa off"]["status"] == correctness["ddgan sdpa off"]["status"] == "ok"
    assert "pix2pix sdpa off" not in correctness  # no attention to switch

    (pytest_item,) = report["sections"]["cuda_tests"]["items"]
    assert pytest_item["finished"] and pytest_item["tests"] >= 10
    assert pytest_item["skipped"] == pytest_item["tests"]  # no CUDA here

    assert "== targets" in completed.stdout and "ATME >= 340 img/s" in report["table"]
    assert "atme resident all on" in completed.stdout  # progress lines as it goes


@pytest.mark.slow
def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    # sabotage: the throughput section cannot import its helpers, the loader module is missing
    blocked = (*NOT_ON_THE_GPU_MACHINE, "train_throughput", "components.data.nvjpeg_loader")
    completed, report = run_check(tmp_path, "--sections", "throughput_pix2pix", "decode", "environment", blocked=blocked)
    assert completed.returncode == 1
    throughput = report["sections"]["throughput_pix2pix"]
    assert throughput["status"] == "failed (exit status 1)" and "train_throughput" in throughput["error"]
    decode = report["sections"]["decode"]
    assert decode["status"] == "ok" and decode["items"]
    assert all(item["status"] == "error" for item in decode["items"])
    assert report["sections"]["environment"]["status"] == "ok"
    assert report["sections"]["environment"]["items"][0]["status"] == "ok"
    assert "== throughput_pix2pix: failed" in completed.stdout


@pytest.mark.slow
def test_no_budget_left_skips_sections_and_says_so(tmp_path):
    completed, report = run_check(tmp_path, "--budget-s", "0")
    assert completed.returncode == 0
    assert report["data"]["pairs"] == 12
    for section in report["sections"].values():
        assert section["status"] == "skipped" and "time budget" in section["notes"][0]


@pytest.mark.slow
def test_a_killed_check_leaves_the_sections_it_finished(tmp_path):
    command, environment = check_command(tmp_path, "--sections", "environment", "cuda_tests")
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    report_path = tmp_path / "out" / "gpu_check.json"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if report_path.exists() and "environment" in json.loads(report_path.read_text())["sections"]:
                break
            assert process.poll() is None, "the check ended before it could be killed"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)  # the check and the section it is running
    finally:
        process.wait()
    report = json.loads(report_path.read_text())
    assert report["sections"]["environment"]["status"] == "ok"
    assert "cuda_tests" not in report["sections"] and "table" not in report


def test_the_check_runs_every_test_file_with_cuda_tests():
    tree = ast.parse(CHECK.read_text())
    listed = next(ast.literal_eval(node.value) for node in tree.body
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CUDA_TEST_FILES")
    marked = re.compile(r"^@pytest\.mark\.cuda$", re.MULTILINE)
    with_cuda = sorted(str(path.relative_to(REPOSITORY)) for path in (REPOSITORY / "tests").rglob("test_*.py")
                       if marked.search(path.read_text()))
    assert sorted(listed) == with_cuda
