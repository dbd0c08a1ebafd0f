"""performance.compile: every block really compiles with Inductor; performance.compile_cache:
the compiled code of one run is what the next run, on a fresh machine, loads instead of compiling.

Each compilation runs in a fresh process (tests/support/compile_child.py) with its own empty
Inductor folder, as a new cluster node or container has: in-process caches would hide a miss.
Inductor builds C++ on the CPU, so these take seconds to a minute each.
"""

import functools
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import torch

from components.networks.atme_w import ATMEW
from components.training.compile_cache import (
    CompileCache,
    compile_cache_location,
    configuration_key,
    session_compile_cache,
)
from support.cli import run_pairgan_train
from support.compile_child import cache_key, small_w
from support.params import shipped, write_shipped
from support.prepared_sets import prepare_small

TESTS = Path(__file__).resolve().parents[1]
REPOSITORY = TESTS.parent


def compile_in_fresh_process(network: str, location: str, inductor_folder: Path, out: Path,
                             extra_env: dict | None = None) -> tuple[dict, str]:
    """Run tests/support/compile_child.py; returns (what it saw, its log)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_folder), "PYTHONPATH": f"{REPOSITORY}:{TESTS}",
           **(extra_env or {})}
    result = subprocess.run([sys.executable, "-m", "support.compile_child", network, location, str(out)],
                            cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stderr


def test_every_attention_block_compiles_and_none_falls_back_to_eager(tmp_path):
    # With dynamo's automatic dynamic shapes, the graph of an attention block seen at a third
    # size was made over symbolic sizes, failed in Inductor and ran eagerly, with a traceback.
    seen, log = compile_in_fresh_process("attention", "-", tmp_path / "inductor", tmp_path / "attention.json")
    assert seen["frames"]["total"] >= 4  # linear attention at several sizes, full attention
    assert seen["frames"]["ok"] == seen["frames"]["total"], log[-3000:]
    assert seen["aot_autograd"].get("not_ok", 0) == 0, log[-3000:]
    assert "WON'T CONVERT" not in log
    # The group norm's and softmax's autocast-off contexts are in these graphs; AOTAutograd's
    # cache keeps them (performance.AUTOCAST_CONTEXT_FUNCTIONS) instead of being bypassed.
    assert seen["aot_autograd"].get("autograd_cache_bypass", 0) == 0, log[-3000:]
    assert seen["aot_autograd"]["autograd_cache_saved"] == seen["frames"]["total"]


def test_a_fresh_machine_loads_the_compiled_code_instead_of_compiling(tmp_path):
    location = str(tmp_path / "storage" / "compile-cache")
    # a damaged file there, for PyTorch's own loader to refuse: compiled over and replaced
    damaged = CompileCache(location, cache_key(small_w()))
    Path(damaged.uri).parent.mkdir(parents=True)
    Path(damaged.uri).write_bytes(b"not a compile cache")
    first, first_log = compile_in_fresh_process("w", location, tmp_path / "inductor-1", tmp_path / "first.json")
    assert first["loaded"] == 0 and first["uri"] == damaged.uri
    assert "is not a compile cache this PyTorch can read; compiling from scratch" in first_log
    assert first["inductor"]["fxgraph_cache_miss"] >= 2  # forward and backward compiled
    assert first["saved"] and len(Path(damaged.uri).read_bytes()) > 0

    second, second_log = compile_in_fresh_process("w", location, tmp_path / "inductor-2", tmp_path / "second.json")
    assert second["loaded"] > 0, second_log[-3000:]
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0, second_log[-3000:]
    assert second["inductor"]["fxgraph_cache_hit"] == first["inductor"]["fxgraph_cache_miss"]
    # W's group norms: AOTAutograd's traced graphs travel in the cache too, so the fresh
    # machine does not trace forward and backward again either.
    assert first["aot_autograd"].get("autograd_cache_bypass", 0) == 0, first_log[-3000:]
    assert second["aot_autograd"].get("autograd_cache_hit", 0) == first["aot_autograd"]["autograd_cache_saved"] >= 1
    assert second["output"] == first["output"]  # the same kernels on the same input


@pytest.fixture
def serialized_compiled_code(monkeypatch):
    """What PyTorch's serializer returns after a compilation, without compiling (the fresh-process
    tests above compile for real)."""
    code = b"compiled code"
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts",
                        lambda: (code, SimpleNamespace(artifacts={"inductor": ["forward", "backward"]})))
    return code


def test_the_cache_travels_through_s3_to_the_next_run(tmp_path, s3_endpoint, monkeypatch, serialized_compiled_code):
    # S3 only carries the bytes: what they hold is PyTorch's (the fresh-process test above).
    bucket = "compile-cache"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    location = f"s3://{bucket}/runs/compile-cache"
    first = CompileCache(location, "key")
    assert first.load() == 0
    assert first.save()
    stored = s3.get_object(Bucket=bucket, Key="runs/compile-cache/key.bin")["Body"].read()
    assert stored == serialized_compiled_code

    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts",
                        lambda data: loaded.append(data) or SimpleNamespace(artifacts={"inductor": ["forward", "backward"]}))
    second = CompileCache(location, "key")  # the next run, on another machine
    assert second.load() == 2 and loaded == [serialized_compiled_code]
    assert not second.save()  # nothing new compiled: the object is not written again


def refuse(data: bytes) -> None:
    return None  # what torch.compiler.load_cache_artifacts returns for bytes it cannot parse


def fail(data: bytes) -> None:
    raise EOFError("ran out of input")


@pytest.mark.parametrize("loader", [refuse, fail])
def test_a_damaged_cache_is_compiled_over_and_replaced(loader, tmp_path, caplog, monkeypatch, serialized_compiled_code):
    # PyTorch's loader itself meets a damaged file in the fresh-process test above; here, both
    # ways it can answer, without importing Inductor into the test process.
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loader)
    cache = CompileCache(str(tmp_path / "compile-cache"), "key")
    Path(cache.uri).parent.mkdir()
    Path(cache.uri).write_bytes(b"not a compile cache")  # a file cut short, or another program's
    with caplog.at_level(logging.INFO, logger="components.training.compile_cache"):
        assert cache.load() == 0
        assert "is not a compile cache this PyTorch can read; compiling from scratch" in caplog.text
        assert cache.save()
    assert Path(cache.uri).read_bytes() == serialized_compiled_code
    assert "2 entries" in caplog.text
    assert not cache.save()  # unchanged since written: not written again


def test_unwritable_storage_warns_and_training_goes_on(tmp_path, caplog, serialized_compiled_code):
    blocker = tmp_path / "a-file"
    blocker.write_text("run.storage_path points below a file")
    cache = CompileCache(str(blocker / "compile-cache"), "key")
    with caplog.at_level(logging.INFO, logger="components.training.compile_cache"):
        assert cache.load() == 0
        assert not cache.save()
    assert "cannot write" in caplog.text and "the next run compiles again" in caplog.text
    assert blocker.read_text() == "run.storage_path points below a file"


def test_the_cache_file_names_its_configuration():
    cpu = torch.device("cpu")
    network = ATMEW(16, channels=(4, 4, 4), groups=2)
    switches = {"compile": True, "autocast": "none"}
    key = configuration_key({"W": network}, switches, 2, 16, cpu)
    assert key == configuration_key({"W": ATMEW(16, channels=(4, 4, 4), groups=2)}, switches, 2, 16, cpu)
    assert key != configuration_key({"W": ATMEW(16, channels=(4, 8, 4), groups=2)}, switches, 2, 16, cpu)
    assert key != configuration_key({"W": network}, {**switches, "autocast": "bf16"}, 2, 16, cpu)
    assert key != configuration_key({"W": network}, switches, 4, 16, cpu)
    assert key != configuration_key({"W": network}, switches, 2, 32, cpu)
    assert CompileCache("/runs/compile-cache", key).uri == f"/runs/compile-cache/{key}.bin"
    assert CompileCache("s3://bucket/runs/compile-cache", key).uri == f"s3://bucket/runs/compile-cache/{key}.bin"


def test_the_cache_lives_under_the_run_storage():
    assert compile_cache_location("/data/checkpoints") == "/data/checkpoints/compile-cache"
    assert compile_cache_location("s3://bucket/pairgan/") == "s3://bucket/pairgan/compile-cache"


def test_only_a_compiling_session_with_a_location_keeps_a_cache(tmp_path, monkeypatch):
    from components.training.loop import TrainingSession

    # dynamo's eager backend: nothing runs here, and Inductor stays out of the test process
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))

    def session(compile_: bool, keep: bool = True) -> TrainingSession:
        train = shipped("train", performance={"compile": compile_, "compile_cache": keep})
        return TrainingSession(shipped("model", image_size=32), train, 8, torch.device("cpu"))

    compiling, plain = session(True), session(False)
    kept = session_compile_cache(str(tmp_path), compiling)
    assert kept is not None and kept.uri.startswith(str(tmp_path))
    assert session_compile_cache(None, compiling) is None
    assert session_compile_cache(str(tmp_path), plain) is None
    assert session_compile_cache(str(tmp_path), session(True, keep=False)) is None  # the switch, off
    assert shipped("train").performance.compile_cache is False  # opt-in: the cache is code the workers run


def test_a_sample_grid_runs_the_compiled_generator_eagerly(monkeypatch):
    from torch._dynamo.utils import counters

    from components.training.loop import TrainingSession

    # dynamo's eager backend: what dynamo would compile is counted, nothing reaches Inductor
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    train = shipped("train", performance={"compile": True})
    session = TrainingSession(shipped("model", image_size=32), train, 8, torch.device("cpu"))
    source = torch.rand(3, 3, 32, 32) * 2 - 1
    torch._dynamo.reset()
    counters.clear()
    images = session.sample(source)
    assert images.shape == source.shape and counters["frames"]["total"] == 0
    with torch.no_grad():  # the control: the same generator called without the eager stance compiles
        session.method.make_sampler()(source)
    assert counters["frames"]["total"] > 0


@pytest.mark.slow
def test_pairgan_train_loads_and_keeps_the_compiled_code_under_its_storage(tmp_path):
    # 16 px pairs: a U-Net of four levels, one fewer block shape to compile than at 32 px
    data = prepare_small(tmp_path / "prepared", image_size=16)
    params = tmp_path / "params"
    write_shipped(params, "model", method={"generator": {"ngf": 8, "max_multiplier": 2},
                                           "discriminator": {"ndf": 8, "n_layers": 2}})
    storage = tmp_path / "checkpoints"
    write_shipped(params, "train", epochs=2, batch_size=2, performance={"compile": True, "compile_cache": True},
                  validation={"samples": 0},
                  run={"storage_path": str(storage), "scaling": {"num_workers": 1, "use_gpu": False},
                       "tracking": {"system_metrics": False}})
    write_shipped(params, "data", image_size=16, loader={"load_scale": 1.125, "num_threads": 1})  # the data's 16 px

    result = run_pairgan_train(params, data, tmp_path, {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    folder = storage / "compile-cache"
    assert f"compile cache: none yet at {folder}/" in output, output[-5000:]
    assert output.index("compile cache: none yet at") < output.index("epoch 1/2 |")  # looked for before compiling
    saved = re.findall(rf"compile cache: (\d+) entries \([\d.]+ MB\) saved to ({re.escape(str(folder))}/\w+\.bin)", output)
    # once, after the last epoch: PyTorch's loader reads only the last part of a file saved twice by one process
    assert len(saved) == 1 and int(saved[0][0]) > 0, output[-5000:]
    assert output.index("epoch 2/2 |") < output.index("saved to")
    assert Path(saved[0][1]).stat().st_size > 0
    assert "WON'T CONVERT" not in output
