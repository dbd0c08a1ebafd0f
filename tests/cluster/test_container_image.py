"""The Dockerfile, checked without a Docker engine: what it copies exists and is not ignored, and it
installs exactly what the README tells a GPU machine to install."""

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (PROJECT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            found.append((keyword.upper(), arguments.strip()))
    return found


def pip_commands(text: str) -> list[str]:
    """Each `pip install ...` in a shell line, split on &&."""
    return [" ".join(part.split()) for part in re.split(r"&&", text) if part.split()[:2] == ["pip", "install"]]


def readme_image_commands() -> list[str]:
    readme = (PROJECT / "README.md").read_text()
    section = readme.split("### Container image", 1)[1].split("\n#", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [command for line in block.splitlines() if not line.startswith("#") for command in pip_commands(line)]


def test_every_copied_path_exists_and_is_in_the_build_context():
    ignored = [line.strip() for line in (PROJECT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copied = []
    for keyword, arguments in instructions():
        if keyword == "COPY":
            copied += [part for part in shlex.split(arguments)[:-1] if not part.startswith("--")]
    assert copied
    for source in copied:
        assert (PROJECT / source).exists(), f"COPY {source}: no such file in the project"
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"COPY {source} is in .dockerignore"


def test_the_image_installs_what_the_readme_says_for_a_gpu_machine():
    runs = [arguments for keyword, arguments in instructions() if keyword == "RUN"]
    installs = [command for run in runs for command in pip_commands(run)]
    assert installs == readme_image_commands()
    # the CUDA build of the torch version the CPU install and CI pin, then the project with the server extra
    ci_torch = re.search(r"torch==[\d.]+", (PROJECT / ".ci/run").read_text()).group(0)
    torch, project = installs
    assert torch.startswith(f"pip install {ci_torch} --index-url https://download.pytorch.org/whl/cu")
    assert project == "pip install '.[server]'"
    extras = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "server" in extras


def test_a_cuda_base_with_the_python_the_project_requires():
    (base,) = [arguments for keyword, arguments in instructions() if keyword == "FROM"]
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    requires = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"
    assert any("python3.11 -m venv" in arguments for keyword, arguments in instructions() if keyword == "RUN")
    assert ("USER", "pairgan") in instructions()


def test_the_image_has_what_triton_builds_its_cuda_module_with():
    # At its first kernel (the fused norm's, torch.compile's) Triton builds its CUDA driver module
    # with the system's C compiler against the Python headers; a CUDA runtime base has neither.
    runs = " ".join(arguments for keyword, arguments in instructions() if keyword == "RUN")
    packages = re.search(r"apt-get install ([^&]+)", runs).group(1).split()
    python = next(package for package in packages if re.fullmatch(r"python3\.\d+", package))
    assert {"gcc", "libc6-dev", f"{python}-dev"} <= set(packages)
    assert f"{python} -m venv /opt/venv" in runs  # the Python whose headers those are
