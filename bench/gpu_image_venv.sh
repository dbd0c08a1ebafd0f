#!/usr/bin/env bash
# Runs tests with the GPU image's PyTorch, torchvision and Triton (2.11, 0.26, 3.6; the CUDA
# builds, which run on the CPU), so that code using an API those versions lack fails here
# rather than in the few minutes of a GPU machine. By default, the tests of what the GPU check
# runs there: the check in --cpu mode, the step profiler, the Triton kernels (interpreter and
# sm_90 compilation), and resuming (its cuda tests run there; its DDP test has failed on 2.11
# alone). The first run installs them into .gpu-image-venv/ (git-ignored): about 3 GB
# downloaded, 2 minutes. The image's Python is 3.12: the venv uses $PYTHON if set, else
# python3.12 where it runs, else python3.
# Usage: bench/gpu_image_venv.sh [pytest arguments]   (rm -rf .gpu-image-venv to build it again)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.gpu-image-venv
if [ ! -e "$venv/installed" ]; then
    rm -rf "$venv"
    python=${PYTHON:-python3}
    if [ -z "${PYTHON:-}" ] && python3.12 -c '' 2>/dev/null; then python=python3.12; fi
    "$python" -m venv "$venv"
    # what the image holds, then what the check brings there (bench/gpu_check_wheels.txt)
    "$venv/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 numpy pillow pyyaml tqdm scikit-image pytest \
        --requirement bench/gpu_check_wheels.txt
    touch "$venv/installed"
fi
"$venv/bin/python" -c 'import sys, torch, torchvision, triton
print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, triton {triton.__version__}")'
if [ $# -eq 0 ]; then
    set -- tests/bench/test_gpu_check_cpu.py tests/bench/test_step_profile.py tests/methods/test_fused_group_norm.py \
        tests/training/test_resume.py
fi
PYTHONPATH="$PWD:$PWD/bench" exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
