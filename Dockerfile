# The pairgan image: the Ray head and GPU workers (ray_cluster.yaml, infra/raycluster.yaml,
# infra/rayjob-train.yaml), the scheduled retraining (infra/retrain-cronjob.yaml) and the MLflow
# tracking server (infra/mlflow-server.yaml). The project is installed in the image, so every
# node runs the same code (docs/training.md, "How the code reaches the nodes").
#
#   docker build -t REGISTRY/pairgan:0.1.0 .
#
# CUDA runtime base for the GPU nodes; Python 3.11 from Ubuntu's packages; wget for KubeRay's
# probes. The install steps are the README's for a GPU machine (README, "Container image"):
# the CUDA build of torch instead of the CPU wheel, then the project, with the PostgreSQL
# driver the tracking server needs. tests/cluster/test_container_image.py checks they match.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# gcc, libc6-dev and python3.11-dev: Triton (the fused norm's kernels, torch.compile's) builds
# its CUDA driver module with them at its first kernel; without them those switches are off.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev gcc libc6-dev \
        git ca-certificates wget \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /opt/pairgan

COPY pyproject.toml README.md ./
COPY components ./components
COPY pipelines ./pipelines
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 && pip install '.[server]'

# The pipeline definition `pairgan retrain` runs (dvc repro) in this folder. No git history in
# the image: DVC runs without it.
COPY dvc.yaml .dvcignore ./
COPY .dvc/config .dvc/.gitignore ./.dvc/
COPY .dvc/plots ./.dvc/plots
COPY params ./params
RUN dvc config --local core.no_scm true

# Not root: Ray, DVC and MLflow need no privileges.
RUN useradd --create-home --uid 1000 pairgan && chown -R pairgan /opt/pairgan
USER pairgan

CMD ["pairgan", "--help"]
