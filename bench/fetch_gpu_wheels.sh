#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) the wheels bench/gpu_check.py needs on the GPU machine
# beyond what its image holds (the list and the image's contents: bench/gpu_check_wheels.txt),
# for CPython 3.12 on x86-64 Linux. The check needs no Ray, MLflow, DALI, WebDataset, DVC or boto3.
# The command that installs them there is in docs/benchmarks.md ("The GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --dest .whl \
    --requirement bench/gpu_check_wheels.txt
ls -l .whl
