"""bench/gpu_check.py in --cpu mode: the GPU check's own code, small, as the GPU machine runs it
(without Ray, MLflow, DALI, WebDataset, DVC or boto3: a sitecustomize makes importing them fail)."""

import ast
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPOSITORY = Path(__file__).resolve().parents[2]
CHECK = REPOSITORY / "bench" / "gpu_check.py"
NOT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "nvidia.dali", "webdataset", "dvc", "boto3", "botocore")
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


def check_command(tmp_path: Path, *arguments: str, blocked: tuple[str, ...] = NOT_ON_THE_GPU_MACHINE,
                  sabotage: str = ""):
    """The command and environment of a --cpu check in which `blocked` modules cannot be imported
    (and `sabotage`, code run at every interpreter start of the check, has run)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=blocked) + sabotage)
    path = [str(site), str(REPOSITORY), *filter(None, [os.environ.get("PYTHONPATH")])]
    # TMPDIR: a killed run's scratch folder stays inside the test's folder
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    return [sys.executable, str(CHECK), "--cpu", "--out", str(tmp_path / "out"), *arguments], environment


def run_check(tmp_path: Path, *arguments: str, blocked: tuple[str, ...] = NOT_ON_THE_GPU_MACHINE, sabotage: str = ""):
    command, environment = check_command(tmp_path, *arguments, blocked=blocked, sabotage=sabotage)
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
    report_path = tmp_path / "out" / "gpu_check.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return completed, report


def items(report: dict, section: str) -> dict[str, dict]:
    return {item["name"]: item for item in report["sections"][section]["items"]}


@pytest.mark.slow
def test_the_cpu_mode_runs_every_section_without_ray_mlflow_dali_webdataset_dvc_boto3(tmp_path):
    completed, report = run_check(tmp_path)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert report["profile"] == "full" and report["data"]["pairs"] == 12
    assert list(report["sections"]) == ["environment", "decode", "throughput_pix2pix", "throughput_atme",
                                        "cuda_tests", "correctness"]
    assert all(section["status"] == "ok" for section in report["sections"].values())
    environment = report["sections"]["environment"]["items"][0]
    assert not any(environment["importable"][name] for name in NOT_ON_THE_GPU_MACHINE)

    decode = items(report, "decode")
    loader_rate = decode["nvjpeg loader, batch 8"]
    assert loader_rate["pairs_per_s"] > 0 and loader_rate["pairs"] == 8  # one epoch of 12 pairs: one full batch
    in_memory = decode["nvJPEG + augmentation on bytes in memory, batch 8"]
    assert in_memory["pairs_per_s"] > 0 and in_memory["jpeg_bytes_per_pair"] > 0
    assert loader_rate["chroma"] == in_memory["chroma"] == "source 4:4:4, target 4:4:4"  # read from the files
    # the same source prepared again with params jpeg_chroma, each timed through the loader:
    # another format, so fewer bytes a pair
    jpeg_bytes = {}
    for name, chroma in (("photos at 4:2:0", "source 4:4:4, target 4:2:0"),
                         ("both sides at 4:2:0", "source 4:2:0, target 4:2:0")):
        assert decode[f"prepare, {name}"]["pairs"] == 12 and decode[f"prepare, {name}"]["chroma"] == chroma
        row = decode[f"nvjpeg loader, {name}, batch 8"]
        assert row["pairs"] == 8 and row["pairs_per_s"] > 0 and row["chroma"] == chroma
        jpeg_bytes[name] = row["jpeg_bytes_per_pair"]
    assert jpeg_bytes["both sides at 4:2:0"] < jpeg_bytes["photos at 4:2:0"] < loader_rate["jpeg_bytes_per_pair"], jpeg_bytes

    for method in ("pix2pix", "atme"):
        rows = items(report, f"throughput_{method}")
        for name in ("fp32 eager", "bf16 eager", "bf16 eager + channels_last", "shipped defaults (auto)"):
            row = rows[f"{method} resident {name}"]
            assert row["status"] == "ok" and row["images_per_s"] > 0 and row["losses_finite"], row
        assert rows[f"{method} resident fp32 eager"]["train_gflop_per_image"] > 0
        assert rows[f"{method} resident bf16 eager"]["switches"]["autocast"] == "bf16"
        assert rows[f"{method} resident bf16 eager + channels_last"]["switches"]["channels_last"]
        assert rows[f"{method} resident bf16 eager + activation checkpointing"]["switches"]["activation_checkpointing"]
    fused = items(report, "throughput_atme")["atme resident bf16 eager + fused norm + channels_last"]
    assert fused["status"] == "ok" and fused["losses_finite"]
    assert fused["switches"]["fused_norm"] and fused["switches"]["channels_last"] and not fused["switches"]["compile"]
    assert not any("fused norm" in name for name in items(report, "throughput_pix2pix"))  # no group norm to fuse
    loader_row = items(report, "throughput_pix2pix")["pix2pix loader bf16 eager"]
    assert loader_row["mode"] == "loader" and 0 < loader_row["fraction_of_resident"]

    correctness = items(report, "correctness")
    exported = correctness["pix2pix fp32 eager + export"]
    assert exported["export_ok"] and exported["export_max_abs_difference"] <= 2e-3
    for method in ("atme", "diffusion_gan", "ddgan"):
        assert correctness[f"{method} fp32 eager"]["losses_finite"]
        for variant in ("bf16", "channels_last", "all on", "shipped defaults (auto)"):
            compared = correctness[f"{method} {variant}"]
            assert compared["status"] == "ok" and max(compared["max_relative_deviation"].values()) <= compared["tolerance"]
            assert compared["generator_output_deviation"] <= compared["tolerance"]
        # on the CPU the shipped switches are fp32 eager's: each step started from fp32's state
        # before it repeats fp32's numbers exactly (a kept state changed by a later run would not)
        shipped = correctness[f"{method} shipped defaults (auto)"]
        assert shipped["generator_output_deviation"] == 0 and set(shipped["max_relative_deviation"].values()) == {0}
    assert correctness["atme sdpa off"]["status"] == correctness["ddgan sdpa off"]["status"] == "ok"
    assert "pix2pix sdpa off" not in correctness  # no attention to switch
    for variant in ("fused_norm", "fused_norm + bf16 + channels_last"):
        for method in ("pix2pix", "atme", "ddgan"):  # pix2pix: the shipped model's instance norms
            compared = correctness[f"{method} {variant}"]
            assert compared["status"] == "ok" and compared["switches"]["fused_norm"], compared
        assert f"diffusion_gan {variant}" not in correctness  # its preset's batch norms: nothing to fuse

    (pytest_item,) = report["sections"]["cuda_tests"]["items"]
    assert pytest_item["marks"] == "cuda" and pytest_item["finished"] and pytest_item["tests"] >= 10
    assert pytest_item["skipped"] == pytest_item["tests"]  # no CUDA here

    assert "== targets" in completed.stdout and "ATME >= 340 img/s" in report["table"]
    # what each switch buys: each row against the same row without its switch, the switch named
    assert "atme     bf16 eager + channels_last vs bf16 eager (channels_last=True): speed x" in report["table"]
    assert "atme resident bf16 eager" in completed.stdout  # progress lines as it goes


@pytest.mark.slow
def test_the_short_profile_measures_what_matters_most_first(tmp_path):
    completed, report = run_check(tmp_path, "--profile", "short")
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert report["profile"] == "short"
    assert list(report["sections"]) == ["environment", "throughput_atme", "throughput_pix2pix", "decode", "correctness",
                                        "atme_fp32_baseline", "cuda_tests"]
    assert all(section["status"] == "ok" for section in report["sections"].values())
    assert report["elapsed_s"] <= report["budget_s"]

    atme = items(report, "throughput_atme")
    assert list(atme) == ["atme resident shipped defaults (auto)", "atme resident bf16 eager + fused norm + channels_last",
                          "atme resident bf16 eager + activation checkpointing"]
    for row in atme.values():
        assert row["images_per_s"] > 0 and row["train_gflop_per_image"] > 0 and row["gib_per_image"] > 0
        assert row["losses_finite"]
    leanest = atme["atme resident bf16 eager + activation checkpointing"]["switches"]
    assert leanest["autocast"] == "bf16" and leanest["fused_adam"] and leanest["sdpa"] and not leanest["channels_last"]
    assert leanest["activation_checkpointing"] and not leanest["compile"] and not leanest["cuda_graphs"]

    pix2pix = items(report, "throughput_pix2pix")
    assert list(pix2pix) == ["pix2pix resident shipped defaults (auto)", "pix2pix loader shipped defaults (auto)"]
    loaded = pix2pix["pix2pix loader shipped defaults (auto)"]
    assert loaded["images_per_s"] > 0 and loaded["fraction_of_resident"] == pytest.approx(
        loaded["images_per_s"] / pix2pix["pix2pix resident shipped defaults (auto)"]["images_per_s"], abs=1e-3)

    assert list(items(report, "decode")) == ["nvjpeg loader, batch 8"]  # the largest batch only

    correctness = items(report, "correctness")
    assert list(correctness) == ["pix2pix fp32 eager + export", "atme fp32 eager", "diffusion_gan fp32 eager",
                                 "ddgan fp32 eager", "pix2pix fused_norm", "atme fused_norm", "ddgan fused_norm",
                                 *(f"{method} shipped defaults (auto)" for method in ("pix2pix", "atme", "diffusion_gan", "ddgan"))]
    assert correctness["pix2pix fp32 eager + export"]["export_ok"]
    for item in correctness.values():
        assert item["status"] == "ok" and item["losses_finite"], item

    (baseline,) = items(report, "atme_fp32_baseline").values()
    assert baseline["name"] == "atme resident fp32 eager" and baseline["switches"]["autocast"] == "none"
    assert baseline["train_gflop_per_image"] == atme["atme resident shipped defaults (auto)"]["train_gflop_per_image"]
    (pytest_item,) = report["sections"]["cuda_tests"]["items"]  # the suite's cuda tests that compile nothing
    assert pytest_item["name"] == "pytest -m 'cuda and not compiles'" and pytest_item["finished"]
    assert 0 < pytest_item["tests"] == pytest_item["collected"] == pytest_item["skipped"]  # no CUDA here

    # nothing compiled, and the report says why; the targets and comparisons read rows of every section
    rows = [item for section in report["sections"].values() for item in section["items"] if "requested" in item]
    assert len(rows) == 6 and not any((row["requested"] or {}).get("compile") for row in rows)
    assert not any(row["switches"]["compile"] for section in report["sections"].values() for row in section["items"]
                   if "switches" in row)
    assert all(row["compiled"] == {} for row in rows)  # what dynamo compiled while the row ran: nothing
    assert "no compile" in report["notes"][0] and "note: no compile" in completed.stdout
    assert "pix2pix whole loop >= 95% of resident: None" not in report["table"]
    assert "atme     shipped defaults (auto) vs fp32 eager" in report["table"]
    assert ("atme     bf16 eager + activation checkpointing vs shipped defaults (auto) (autocast=bf16, fused_adam=True, "
            "activation_checkpointing=True)") in report["table"]
    assert ("atme     bf16 eager + fused norm + channels_last vs shipped defaults (auto) (autocast=bf16, channels_last=True, "
            "fused_adam=True, fused_norm=True): speed x") in report["table"]


def test_a_section_the_profile_does_not_have_is_refused(tmp_path):
    completed = subprocess.run([sys.executable, str(CHECK), "--cpu", "--out", str(tmp_path), "--profile", "short",
                                "--sections", "decode", "throughput_ddgan"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "profile short has no section throughput_ddgan; its sections: environment, throughput_atme" in completed.stderr
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    # sabotage: the throughput section cannot import the training loop, the loader module is missing
    blocked = (*NOT_ON_THE_GPU_MACHINE, "components.training.loop", "components.data.nvjpeg_loader")
    completed, report = run_check(tmp_path, "--sections", "throughput_pix2pix", "decode", "environment", blocked=blocked)
    assert completed.returncode == 1
    throughput = report["sections"]["throughput_pix2pix"]
    assert throughput["status"] == "failed (exit status 1)" and "components.training.loop" in throughput["error"]
    decode = report["sections"]["decode"]
    assert decode["status"] == "ok" and decode["items"]
    decoding = [item for item in decode["items"] if not item["name"].startswith("prepare")]
    assert decoding and all(item["status"] == "error" for item in decoding)
    assert report["sections"]["environment"]["status"] == "ok"
    assert report["sections"]["environment"]["items"][0]["status"] == "ok"
    assert "== throughput_pix2pix: failed" in completed.stdout


GROUP_NORM_WRONG_UNDER_BF16_OR_FUSED = '''
import torch
from torch.nn import functional as F

from components.networks import norms

unfused_forward, fused_operation = norms.GroupNorm.forward, norms.group_norm_activation


def one_group_under_bf16(self, x, scale=None, shift=None, silu=False):
    if self.fused or x.dtype == torch.float32:
        return unfused_forward(self, x, scale, shift, silu)
    with torch.autocast(x.device.type, enabled=False):
        h = F.group_norm(x, 1, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
    if scale is not None:
        h = torch.addcmul(shift.to(h.dtype), h, 1 + scale.to(h.dtype))
    return F.silu(h) if silu else h


def fused_over_one_group(x, groups, weight, bias, eps, scale=None, shift=None, silu=False):
    return fused_operation(x, 1, weight, bias, eps, scale, shift, silu)


norms.GroupNorm.forward = one_group_under_bf16
norms.group_norm_activation = fused_over_one_group
'''
# PatchGAN's logits tripled under bf16: the generator's output is untouched, the losses are not.
LOGITS_WRONG_UNDER_BF16 = '''
import torch

from components.networks import pix2pix

patch_forward = pix2pix.PatchGAN.forward


def tripled_under_bf16(self, *inputs):
    logits = patch_forward(self, *inputs)
    return logits * 3 if logits.dtype == torch.bfloat16 else logits


pix2pix.PatchGAN.forward = tripled_under_bf16
'''


@pytest.mark.slow
def test_a_switch_that_computes_something_else_fails_the_correctness_check(tmp_path):
    # The DDPM U-Net's group norms wrong (one group) on the unfused bf16 path and in the fused
    # operation. The losses of the first steps hardly see either (the generator's
    # output is near 0, its L1 loss near |target|); the output does. And the discriminator's
    # logits wrong under bf16, which the generator's output cannot show (each step starts from
    # the fp32 run's state); the losses do.
    completed, report = run_check(tmp_path, "--sections", "correctness",
                                  sabotage=GROUP_NORM_WRONG_UNDER_BF16_OR_FUSED + LOGITS_WRONG_UNDER_BF16)
    assert completed.returncode == 1
    correctness = items(report, "correctness")
    for method in ("atme", "ddgan"):
        for variant in ("bf16", "fused_norm", "fused_norm + bf16 + channels_last"):
            wrong = correctness[f"{method} {variant}"]
            assert wrong["status"] == "failed" and wrong["generator_output_deviation"] > wrong["tolerance"], wrong
        assert correctness[f"{method} channels_last"]["status"] == "ok"  # the unfused float32 path is untouched
    # pix2pix's fused instance norms are the same operation, over one group instead of one per channel
    for variant in ("fused_norm", "fused_norm + bf16 + channels_last"):
        wrong = correctness[f"pix2pix {variant}"]
        assert wrong["status"] == "failed" and wrong["generator_output_deviation"] > wrong["tolerance"], wrong
    wrong_d = correctness["pix2pix bf16"]  # no group norm in pix2pix, its instance norms unfused: only its D is wrong
    assert wrong_d["status"] == "failed" and wrong_d["generator_output_deviation"] <= wrong_d["tolerance"], wrong_d
    assert wrong_d["max_relative_deviation"]["loss/D"] > wrong_d["tolerance"], wrong_d
    assert correctness["pix2pix channels_last"]["status"] == "ok"
    assert "failed   atme bf16" in completed.stdout


@pytest.mark.slow
def test_no_budget_left_skips_sections_and_says_so(tmp_path):
    completed, report = run_check(tmp_path, "--budget-s", "0")
    assert completed.returncode == 0
    assert report["data"]["pairs"] == 12
    for section in report["sections"].values():
        assert section["status"] == "skipped" and "time budget" in section["notes"][0]


@pytest.mark.slow
def test_a_killed_check_leaves_every_item_it_finished(tmp_path):
    command, environment = check_command(tmp_path, "--sections", "environment", "correctness")
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    report_path = tmp_path / "out" / "gpu_check.json"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            sections = json.loads(report_path.read_text())["sections"] if report_path.exists() else {}
            if sections.get("correctness", {}).get("items"):  # an item of the section still running
                break
            assert process.poll() is None, "the check ended before it could be killed"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)  # the check and the section it is running
    finally:
        process.wait()
    report = json.loads(report_path.read_text())
    assert report["sections"]["environment"]["status"] == "ok"
    correctness = report["sections"]["correctness"]
    assert correctness["status"] == "running" and correctness["items"][0]["name"] == "pix2pix fp32 eager + export"
    assert correctness["items"][0]["status"] == "ok"
    assert list(report["sections"]) == ["environment", "correctness"] and "table" not in report


def test_the_check_runs_every_test_file_with_cuda_tests():
    tree = ast.parse(CHECK.read_text())
    listed = next(ast.literal_eval(node.value) for node in tree.body
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CUDA_TEST_FILES")
    marked = re.compile(r"^@pytest\.mark\.cuda$", re.MULTILINE)
    with_cuda = sorted(str(path.relative_to(REPOSITORY)) for path in (REPOSITORY / "tests").rglob("test_*.py")
                       if marked.search(path.read_text()))
    assert sorted(listed) == with_cuda


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CUT_SHORT = """============================= test session starts ==============================
collecting ... collected 37 items / 31 deselected / 6 selected

tests/data/test_nvjpeg_loader.py::test_gpu_decoding_gives_the_batches_of_cpu_decoding PASSED [ 16%]
tests/data/test_nvjpeg_loader.py::test_gpu_batches_are_complete_while_the_training_stream_is_busy PASSED [ 33%]
"""


def test_cuda_tests_cut_at_the_budget_are_partial_and_a_failing_one_fails_the_check(gpu_check):
    def report_with(item: dict) -> dict:
        return {"data": {}, "sections": {"cuda_tests": {"status": "ok", "items": [{"name": "pytest", **item}]}}}

    cut = gpu_check.pytest_result(CUT_SHORT, False, None, "cuda and not compiles")
    assert cut["status"] == "partial" and cut["passed"] == 2 and cut["collected"] == 6
    assert "time budget: 2 of 6 tests ran" in gpu_check.summarise_item({"name": "pytest", **cut})
    assert not gpu_check.failed(report_with(cut))

    failing = CUT_SHORT + "tests/training/test_performance.py::test_sdpa_and_written_out_attention_agree_on_cuda FAILED [ 50%]\n"
    broken = gpu_check.pytest_result(failing, False, None, "cuda")
    assert broken["status"] == "failed"
    assert broken["failed_tests"] == ["tests/training/test_performance.py::test_sdpa_and_written_out_attention_agree_on_cuda"]
    assert gpu_check.failed(report_with(broken))

    assert "status" not in gpu_check.pytest_result(CUT_SHORT, True, 0, "cuda")  # finished, all passed: ok
    crashed = gpu_check.pytest_result("ImportError while loading conftest", True, 4, "cuda")
    assert crashed["status"] == "failed" and crashed["error"] == "pytest exited 4"


def test_the_correctness_runs_take_the_shipped_pix2pix_norms(gpu_check):
    shipped = yaml.safe_load((REPOSITORY / "params" / "model.yaml").read_text())["method"]
    assert shipped["name"] == "pix2pix"
    assert gpu_check.SHIPPED_PIX2PIX_NORMS == {network: {"norm": shipped[network]["norm"]}
                                               for network in ("generator", "discriminator")}
