"""What the benchmarks run, and how they measure it.

- Params: the shipped params/*.yaml with a benchmark's overrides, validated as the stages
  validate them; the networks at the reference architectures of the params/examples/
  presets (the sizes docs/methods.md gives for the published implementations, at which the
  reference throughput was measured); the loader resizing to 286 before its 256 crop, as the
  references do.
- Data: a pix2pix-layout folder (the facades set) prepared by the project's own writer, as
  `pairgan prepare` prepares it.
- Measurement: a training step timed with the device synchronised, its model FLOPs counted,
  its peak memory read.

bench/train_throughput.py, loader_throughput.py, shard_verification.py, chroma_fidelity.py and gpu_check.py all
build on these, so that their figures are of the same workload. Nothing here imports Ray,
MLflow, DALI, WebDataset, DVC or boto3: gpu_check runs it on a GPU image without them.
"""

import gc
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from components.config import read_yaml_mapping, validate_params, with_overrides
from components.config.data import DataParams, LoaderParams
from components.config.model import ModelParams
from components.config.train import TrainParams
from components.data.batch import Batch

REPOSITORY = Path(__file__).resolve().parents[1]
PARAMS = REPOSITORY / "params"

# The reference implementations resize to 286 before their random 256 crop (pix2pix's load_size).
REFERENCE_LOAD_SCALE = 286 / 256
# Each method at the architecture its reference was measured at (docs/methods.md, "presets").
REFERENCE_PRESETS = {
    "pix2pix": "pix2pix-reference",
    "diffusion_gan": "diffusion-gan-reference",
    "atme": "atme-reference",
    "ddgan": "ddgan-reference",
}
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by device-name fragment.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def shipped_params(name: str) -> dict:
    """params/<name>.yaml as a mapping."""
    return read_yaml_mapping(PARAMS / f"{name}.yaml")


def loader_params(overrides: dict | None = None) -> LoaderParams:
    """The shipped loader params at the references' 286/256 load scale, with `overrides`."""
    data = with_overrides(shipped_params("data")["loader"], {"load_scale": REFERENCE_LOAD_SCALE, **(overrides or {})})
    return validate_params(data, LoaderParams, PARAMS / "data.yaml")


def model_params(method: str, image_size: int, method_overrides: dict | None = None,
                 load_scale: float = REFERENCE_LOAD_SCALE) -> ModelParams:
    """`method` at its reference architecture (its params/examples preset) for `image_size`,
    with `method_overrides` merged into the preset's `method:` block."""
    path = PARAMS / "examples" / f"{REFERENCE_PRESETS[method]}.yaml"
    preset = read_yaml_mapping(path)
    preset["method"] = with_overrides(preset["method"], method_overrides or {})
    sized = {**preset, "image_size": image_size, "load_size": round(image_size * load_scale)}
    return validate_params(sized, ModelParams, path)


def train_params(batch_size: int, performance: dict | None = None) -> TrainParams:
    """The shipped params/train.yaml with this batch size and these performance switches."""
    data = with_overrides(shipped_params("train"), {"batch_size": batch_size, "performance": performance or {}})
    return validate_params(data, TrainParams, PARAMS / "train.yaml")


def prepare_pix2pix_folder(source: Path, out: Path, image_size: int, data_overrides: dict | None = None) -> Path:
    """Prepare a pix2pix-layout folder (each image photo | labels, as the facades set) into `out`
    with the project's writer, labels -> photo; returns `out`."""
    from components.data.sources import open_source
    from components.data.writer import prepare_dataset

    data = with_overrides(shipped_params("data"), {
        "source": {"kind": "pix2pix", "path": str(source.resolve()), "direction": "BtoA"}, "image_size": image_size,
        **(data_overrides or {}),
    })
    params = validate_params(data, DataParams, PARAMS / "data.yaml", context={"base_dir": Path.cwd()})
    prepare_dataset(params, open_source(params, Path.cwd()), out, progress=False)
    return out


def shard_kib_per_pair(prepared: Path) -> float:
    """The train split's shards' size per pair, in KiB (tar headers included)."""
    from components.data.manifest import load_manifest

    train = load_manifest(prepared).split("train")
    return sum((prepared / shard.tar).stat().st_size for shard in train.shards) / train.count / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Peak resident set of this process (KiB on Linux): the CPU counterpart, an upper bound.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def release_device(device: torch.device, forget_compiled: bool = True) -> None:
    """Free the last run's memory and peak statistics; forget_compiled: its compiled graphs too,
    so that the next run's warm-up includes its own compilation."""
    if forget_compiled and "torch._dynamo" in sys.modules:  # importing dynamo costs seconds; it is there once used
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def compile_counts() -> dict[str, int]:
    """This process's running counts of what dynamo compiled (graphs, graph breaks, frames it gave
    up on and left eager) and of AOTAutograd's and Inductor's cache outcomes; empty before
    anything compiled."""
    if "torch._dynamo" not in sys.modules:  # importing dynamo costs seconds; it is there once used
        return {}
    counters = torch._dynamo.utils.counters
    frames = counters["frames"]
    return {
        "compiled_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "frames_not_converted": frames["total"] - frames["ok"],
        **{f"aot_{key}": value for key, value in counters["aot_autograd"].items() if key.startswith("autograd_cache")},
        **{key: value for key, value in counters["inductor"].items() if key.startswith("fxgraph_cache")},
    }


def compiled_since(before: dict[str, int]) -> dict[str, int]:
    """What was compiled, and found in the compile caches, since `before` (a `compile_counts()`):
    the counts that changed (a warm start has cache hits and no misses)."""
    return {key: value - before.get(key, 0) for key, value in compile_counts().items() if value != before.get(key, 0)}


def random_batch(batch_size: int, image_size: int, dataset_size: int, device: torch.device) -> Batch:
    """Seeded random pairs in [-1, 1] (uncropped, unflipped) on `device`: a resident batch where
    no real one is needed or the loader cannot give one."""
    generator = torch.Generator().manual_seed(0)
    batch = {
        "source": torch.rand(batch_size, 3, image_size, image_size, generator=generator) * 2 - 1,
        "target": torch.rand(batch_size, 3, image_size, image_size, generator=generator) * 2 - 1,
        "index": torch.arange(batch_size) % dataset_size,
        "flip": torch.zeros(batch_size, dtype=torch.bool),
        "crop": torch.zeros(batch_size, 2, dtype=torch.int64),
    }
    return {key: value.to(device) for key, value in batch.items()}


def flops_per_image(session, batch: Batch, batch_size: int) -> float:
    """Model FLOPs of one whole training step (`session`: a TrainingSession) per image. Run it on
    an uncompiled session: compiled code does not pass through the dispatcher the counter watches."""
    counter = FlopCounterMode(display=False)
    with counter:
        session.train_step(batch)
    return counter.get_total_flops() / batch_size


def peak_tflops(device: torch.device, given: float | None = None) -> float | None:
    """The device's dense bf16 peak (`given` wins; None where unknown, and on the CPU)."""
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def time_steps(session, batches: Iterable[Batch], steps: int, device: torch.device) -> tuple[float, int]:
    """(seconds, images) of `steps` training steps of `session` over `batches`, the device synchronised."""
    images = 0
    synchronize(device)
    started = time.perf_counter()
    for _, batch in zip(range(steps), batches):
        session.train_step(batch)
        images += batch["source"].shape[0]
    synchronize(device)
    return time.perf_counter() - started, images


def endless(loader: Iterable[Batch]) -> Iterator[Batch]:
    """Batches of one epoch after another."""
    while True:
        yield from loader
