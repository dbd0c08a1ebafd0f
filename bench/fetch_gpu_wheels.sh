#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) the wheels bench/gpu_check.py needs on the GPU machine
# beyond what its image holds (PyTorch 2.11 + CUDA 13, torchvision, Triton, numpy, Pillow,
# PyYAML, tqdm, scikit-image, pytest): pydantic and what it depends on, for CPython 3.12 on
# x86-64 Linux. The check needs no Ray, MLflow, DALI, WebDataset or DVC.
# The command that installs them there is in docs/benchmarks.md ("The GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --dest .whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.7.0 typing-inspection==0.4.5 typing-extensions==4.16.0
ls -l .whl
