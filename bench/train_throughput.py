"""Training throughput per method: images/s, step time, peak memory and model-FLOPs utilisation.

Each method runs the real training step (`TrainingSession.train_step`: G-main, D-main, the
method's after_step) at the reference architecture (the presets params/examples/<method>-reference.yaml:
pix2pix U-Net ngf 64, ATME/DDGAN DDPM U-Net width 64, multipliers 1-2-4-8, PatchGAN ndf 64),
in two ways:
  resident: one batch kept on the device, stepped repeatedly (the compute ceiling);
  loader:   batches from the real loader over ../shared/data/facades (decode + augmentation).

    python bench/train_throughput.py                                   # GPU: 256 px, batch 32, every method
    python bench/train_throughput.py --image-size 64 --batch-size 4 --steps 5 --methods pix2pix atme   # CPU
    python bench/train_throughput.py --prepared DIR                    # reuse a prepared facades folder

FLOPs are counted once per method with torch.utils.flop_counter.FlopCounterMode over one whole
training step (forward and backward of every phase), divided by the batch size. MFU is
(FLOP per image x images/s) / the device's peak dense rate (--peak-tflops; known for H100/H200).
Run by hand; results go to docs/benchmarks.md with the machine and the command.
"""

import argparse
import itertools
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from components.config import read_yaml_mapping, validate_params, with_overrides
from components.config.data import DataParams
from components.config.model import ModelParams, load_model_params
from components.config.train import TrainParams
from components.data.loaders import make_loader
from components.training.loop import TrainingSession

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by device-name fragment.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
PARAMS = Path(__file__).resolve().parents[1] / "params"


def data_params(args: argparse.Namespace) -> DataParams:
    # Each facades JPEG is photo | labels: labels -> photo makes the right half the source.
    overrides = {"source": {"kind": "pix2pix", "path": str(args.data.resolve()), "direction": "BtoA"},
                 "image_size": args.image_size,
                 "loader": {"load_scale": 286 / 256, "num_threads": args.threads, "backend": args.backend}}
    return validate_params(with_overrides(read_yaml_mapping(PARAMS / "data.yaml"), overrides), DataParams,
                           PARAMS / "data.yaml", context={"check_source_path": False})


def prepare_facades(data: DataParams, out: Path) -> Path:
    from components.data.sources import open_source
    from components.data.writer import prepare_dataset

    prepare_dataset(data, open_source(data, Path.cwd()), out, progress=False)
    return out


def model_params(method: str, data: DataParams) -> ModelParams:
    return load_model_params(PARAMS / "examples" / f"{method}-reference.yaml", data, PARAMS / "data.yaml")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Peak resident set of this process (KiB on Linux): the CPU counterpart, an upper bound.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def flops_per_image(session: TrainingSession, batch: dict, batch_size: int) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        session.train_step(batch)
    return counter.get_total_flops() / batch_size


def time_steps(session: TrainingSession, batches, steps: int, device: torch.device) -> tuple[float, int]:
    images = 0
    synchronize(device)
    started = time.perf_counter()
    for _, batch in zip(range(steps), batches):
        session.train_step(batch)
        images += batch["source"].shape[0]
    synchronize(device)
    return time.perf_counter() - started, images


def endless(loader):
    while True:
        yield from loader


def bench_method(method: str, prepared: Path, data: DataParams, args: argparse.Namespace, device: torch.device) -> list[dict]:
    model = model_params(method, data)
    # The detector's host sync every 50 steps is part of the product's step; keep it.
    train_overrides = {"batch_size": args.batch_size, "performance": {"compile": args.compile}}
    train = validate_params(with_overrides(read_yaml_mapping(PARAMS / "train.yaml"), train_overrides), TrainParams,
                            PARAMS / "train.yaml")
    loader = make_loader(prepared, "train", data.loader, args.batch_size, train=True, device=device)
    session = TrainingSession(model, train, loader.manifest.split("train").count, device)
    batches = endless(loader)
    resident = next(batches)
    resident = {key: value.to(device) for key, value in resident.items()}
    for _ in range(args.warmup):  # allocator, cuDNN autotuning, compilation
        session.train_step(resident)
    flops = flops_per_image(session, resident, args.batch_size)
    peak_tflops = args.peak_tflops
    if peak_tflops is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak_tflops = next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)

    rows = []
    for mode in args.modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        source = itertools.repeat(resident) if mode == "resident" else batches
        seconds, images = time_steps(session, source, args.steps, device)
        rate = images / seconds
        rows.append({
            "method": method, "mode": mode, "image_size": args.image_size, "batch_size": args.batch_size,
            "images_per_s": round(rate, 2), "step_ms": round(1000 * seconds / args.steps, 1),
            "peak_memory_gib": round(peak_memory_gib(device), 2),
            "peak_memory_per_image_gib": round(peak_memory_gib(device) / args.batch_size, 3),
            "train_gflop_per_image": round(flops / 1e9, 2),
            "achieved_tflops": round(flops * rate / 1e12, 3),
            "mfu": round(flops * rate / (peak_tflops * 1e12), 4) if peak_tflops else None,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["pix2pix", "atme", "ddgan"], choices=["pix2pix", "atme", "ddgan"])
    parser.add_argument("--modes", nargs="+", default=["resident", "loader"], choices=["resident", "loader"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="loader decode threads")
    parser.add_argument("--backend", default="auto", choices=["auto", "dali", "torch"])
    parser.add_argument("--compile", action="store_true", help="torch.compile every network")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/facades"))
    parser.add_argument("--prepared", type=Path, default=None, help="a prepared facades folder to reuse")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(json.dumps({"machine": platform.node(), "cpu_count": torch.get_num_threads(), "torch": torch.__version__,
                      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}))
    with tempfile.TemporaryDirectory() as scratch:
        data = data_params(args)
        prepared = args.prepared or prepare_facades(data, Path(scratch) / "facades")
        for method in args.methods:
            bench_method(method, prepared, data, args, device)


if __name__ == "__main__":
    main()
