"""bench/chroma_fidelity.py on a small pix2pix folder: each setting's stored halves compared with
the right source halves, less kept at 4:2:0 than at 4:4:4."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]


def test_each_setting_is_scored_against_the_source_halves_it_stores(tmp_path, write_pix2pix):
    write_pix2pix(tmp_path / "pairs", {"train": 6}, size=32)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), str(REPOSITORY / "bench")])}
    command = [sys.executable, str(REPOSITORY / "bench" / "chroma_fidelity.py"), "--data", str(tmp_path / "pairs"),
               "--image-size", "32", "--chroma", "4:4:4", "4:2:0"]
    completed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {}
    for line in completed.stdout.splitlines():
        match = re.fullmatch(r"\| (4:\d:\d) \| ([\d.]+) \| ([\d.]+) / [\d.]+ dB \| ([\d.]+) / [\d.]+ dB \|", line)
        if match:
            rows[match[1]] = [float(value) for value in match.groups()[1:]]
    assert set(rows) == {"4:4:4", "4:2:0"}, completed.stdout
    full, subsampled = rows["4:4:4"], rows["4:2:0"]
    # at quality 95 each stored half is close to its own source half (a swapped side scores far lower)
    assert min(full[1:]) > 30, rows
    assert subsampled[0] < full[0] and subsampled[1] < full[1] and subsampled[2] < full[2], rows
