"""bench/step_profile.py on the CPU: each variant measured with the switches it asked for, on the
networks asked for, the profiled one's heaviest operators written out, a bad variant a row of
its own, a bad network refused before anything runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
BF16 = "bf16 autocast, a name longer than the others together"
ENVIRONMENT = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), str(REPOSITORY / "bench")])}
PIX2PIX = [sys.executable, str(REPOSITORY / "bench" / "step_profile.py"), "--method", "pix2pix", "--batch-size", "2",
           "--image-size", "32", "--steps", "1", "--warmup", "1"]
INSTANCE_NORMS = '{"generator": {"norm": "instance"}, "discriminator": {"norm": "instance"}}'


def test_variants_are_measured_profiled_and_a_bad_one_is_a_row_not_the_end(tmp_path):
    command = [*PIX2PIX, "--out", str(tmp_path), "--kernels", "5", "--method-overrides", INSTANCE_NORMS,
               "--variant", "shipped", "{}", "--variant", "misspelt", '{"channel_last": true}',
               "--variant", BF16, '{"autocast": "bf16"}', "--compile-cache", str(tmp_path / "compile-cache")]
    completed = subprocess.run(command, env=ENVIRONMENT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads((tmp_path / "step_profile.json").read_text())}
    assert list(rows) == ["shipped", "misspelt", BF16]
    # the reference preset's batch norms replaced, and the row says which networks it measured
    assert rows["shipped"]["model"]["generator"]["norm"] == rows[BF16]["model"]["discriminator"]["norm"] == "instance"
    assert rows["shipped"]["model"]["generator"]["ngf"] == 64  # the rest of the preset kept
    assert rows["shipped"]["status"] == "ok" and rows["shipped"]["images_per_s"] > 0
    assert rows["shipped"]["switches"]["autocast"] == "none"  # auto is off on the CPU
    assert rows[BF16]["status"] == "ok" and rows[BF16]["switches"]["autocast"] == "bf16"
    assert rows["misspelt"]["status"] == "error" and "performance.channel_last: unknown key" in rows["misspelt"]["error"]
    # only the first variant is profiled unless --profile-variants names others
    kernels = (tmp_path / "kernels_shipped.txt").read_text()
    assert "convolution" in kernels and "time by kind" in kernels
    # each copy charged to the operator that made it: here the convolutions' backward passes
    # copying the gradients that the skip concatenations hand back as strided views
    copies = kernels.split("by the operators that made them")[1].splitlines()[2:]
    assert any("aten::copy_ < aten::clone < aten::contiguous < aten::convolution_backward" in line for line in copies), kernels
    assert sum(rows["shipped"]["device_ms_by_kind"].values()) > 0 and "device_ms_by_kind" not in rows[BF16]
    assert [path.name for path in tmp_path.glob("kernels_*.txt")] == ["kernels_shipped.txt"]
    # the summary: a row per variant, its columns under the headings however long the names
    header, shipped, misspelt, bf16 = completed.stdout.splitlines()[-4:]
    assert misspelt.startswith("misspelt ") and "error" in misspelt
    for row in (shipped, bf16):
        assert len(row) == len(header) and row[header.index("img/s") - 1] == " ", (header, row)
    assert shipped.startswith("shipped ") and bf16.startswith(BF16 + " ")
    assert rows["shipped"]["compiled"] == rows[BF16]["compiled"] == {}  # compile is off under auto on the CPU
    # nothing compiled: the cache is looked for, and nothing is written
    assert f"compile cache: 0 entries loaded from {tmp_path / 'compile-cache'}" in completed.stdout
    assert "compile cache: unchanged at" in completed.stdout and not (tmp_path / "compile-cache").exists()


def test_networks_the_method_cannot_build_are_refused_before_anything_runs(tmp_path):
    command = [*PIX2PIX, "--out", str(tmp_path), "--variant", "shipped", "{}",
               "--method-overrides", '{"generator": {"norm": "instanse"}}']
    completed = subprocess.run(command, env=ENVIRONMENT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 2
    assert "--method-overrides" in completed.stderr and "method.generator.norm" in completed.stderr
    assert not (tmp_path / "step_profile.json").exists()
