"""Training throughput per method: images/s, step time, peak memory and model-FLOPs utilisation.

Each method runs the real training step (`TrainingSession.train_step`: every phase and the
method's after_step) at the reference architecture (pix2pix U-Net ngf 64 and PatchGAN ndf 64
with batch norm; ATME/DDGAN DDPM U-Net width 64, multipliers 1-2-4-8, ATME's attention at
every level, as the references), in two ways:
  resident: one batch kept on the device, stepped repeatedly (the compute ceiling);
  loader:   batches from the real loader over a prepared pix2pix-layout set (decode + augmentation).

    python bench/train_throughput.py --data DIR                        # GPU: 256 px, batch 32, every method
    python bench/train_throughput.py --data DIR --image-size 64 --batch-size 4 --steps 5 --methods pix2pix atme  # CPU
    python bench/train_throughput.py --prepared DIR                    # reuse a prepared folder

FLOPs are counted once per method with torch.utils.flop_counter.FlopCounterMode over one whole
eager training step (forward and backward of every phase), divided by the batch size. MFU is
(FLOP per image x images/s) / the device's peak dense bf16 rate (--peak-tflops; known for
H100/H200). The params are the shipped params/*.yaml with the reference architecture and the
given switches on top. bench/gpu_check.py builds on the helpers here.
Run by hand; results go to docs/benchmarks.md with the machine and the command.
"""

import argparse
import copy
import itertools
import json
import platform
import resource
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from components.config.data import DataParams, LoaderParams
from components.config.model import ModelParams
from components.config.train import TrainParams
from components.data.batch import Batch
from components.data.loaders import make_loader
from components.training.loop import TrainingSession

REPOSITORY = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by device-name fragment.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

# The architectures the reference implementations were measured at (docs/benchmarks.md),
# complete so that they validate against params that name every key.
LOSS = {"gan_loss": "vanilla", "label_smoothing": 0.0, "lambda_l1": 100.0, "r1_gamma": 0.0, "r1_interval": 16}
DDPM_UNET = {
    "width": 64, "channel_multipliers": [1, 2, 4, 8], "attention_levels": [0, 1, 2, 3], "blocks_per_level": 2,
    "groups": 8, "attention_heads": 4, "attention_head_dim": 32, "dropout": 0.0,
}
REFERENCE_METHODS: dict[str, dict] = {
    "pix2pix": {
        "name": "pix2pix",
        "generator": {"ngf": 64, "max_multiplier": 8, "norm": "batch", "dropout": 0.5},
        "discriminator": {"ndf": 64, "n_layers": 3, "norm": "batch"},
        "loss": LOSS,
        "diffusion_gan": None,
    },
    "atme": {
        "name": "atme",
        "generator": DDPM_UNET,
        "discriminator": {"ndf": 64, "n_layers": 3, "norm": "batch"},
        "w": {"channels": [32, 64, 32], "groups": 8},
        "loss": LOSS,
        "test_map_logit": 0.0,
        "diffusion_gan": None,
    },
    "ddgan": {
        "name": "ddgan",
        "generator": {**DDPM_UNET, "attention_levels": [2, 3]},
        "discriminator": {"ndf": 64, "n_layers": 3, "norm": "none"},
        "loss": {**LOSS, "lambda_l1": 0.0, "r1_gamma": 0.05, "r1_interval": 15},
        "num_steps": 4,
        "beta_min": 0.1,
        "beta_max": 20.0,
        "nz": 100,
        "ema_decay": 0.999,
        "guidance": {"p_uncond": 0.1, "weight": 0.0},
    },
}
DIFFUSION_GAN = {
    "t_min": 5, "t_max": 500, "beta_start": 1.0e-4, "beta_end": 2.0e-2, "sigma": 0.05,
    "t_distribution": "priority", "update_interval": 4, "ada_kimg": 100.0, "d_target": 0.6,
}
REFERENCE_METHODS["diffusion_gan"] = {**REFERENCE_METHODS["pix2pix"], "diffusion_gan": DIFFUSION_GAN}


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in, nested mappings key by key."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def shipped_params(name: str) -> dict:
    return yaml.safe_load((REPOSITORY / "params" / name).read_text())


def model_params(method: str, image_size: int, method_overrides: dict | None = None) -> ModelParams:
    """The reference architecture of `method` at `image_size`, with `method_overrides` merged into its `method:`."""
    spec = merged(REFERENCE_METHODS[method], method_overrides or {})
    data = shipped_params("model.yaml")
    data.update({"image_size": image_size, "load_size": image_size * 286 // 256, "method": spec})
    return ModelParams.model_validate(data)


def train_params(batch_size: int, performance: dict | None = None) -> TrainParams:
    """The shipped params/train.yaml with this batch size and these performance switches."""
    data = merged(shipped_params("train.yaml"), {"batch_size": batch_size, "performance": performance or {}})
    return TrainParams.model_validate(data)


def loader_params(image_size: int, overrides: dict | None = None) -> LoaderParams:
    data = merged(shipped_params("data.yaml")["loader"], {"load_size": image_size * 286 // 256, "crop_size": image_size})
    return LoaderParams.model_validate(merged(data, overrides or {}))


def prepare_facades(source: Path, out: Path, image_size: int) -> Path:
    from components.data.sources import open_source
    from components.data.writer import prepare_dataset

    # Each facades JPEG is photo | labels: labels -> photo makes the right half the source.
    data = merged(shipped_params("data.yaml"), {
        "source": {"kind": "pix2pix", "path": str(source.resolve()), "direction": "BtoA"}, "image_size": image_size,
    })
    params = DataParams.model_validate(data, context={"base_dir": Path.cwd()})
    prepare_dataset(params, open_source(params, Path.cwd()), out, progress=False)
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Peak resident set of this process (KiB on Linux): the CPU counterpart, an upper bound.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def flops_per_image(session: TrainingSession, batch: Batch, batch_size: int) -> float:
    """Model FLOPs of one whole training step per image. Run it on an eager session: compiled
    code does not pass through the dispatcher the counter watches."""
    counter = FlopCounterMode(display=False)
    with counter:
        session.train_step(batch)
    return counter.get_total_flops() / batch_size


def peak_tflops(device: torch.device, given: float | None = None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def time_steps(session: TrainingSession, batches: Iterable[Batch], steps: int, device: torch.device) -> tuple[float, int]:
    images = 0
    synchronize(device)
    started = time.perf_counter()
    for _, batch in zip(range(steps), batches):
        session.train_step(batch)
        images += batch["source"].shape[0]
    synchronize(device)
    return time.perf_counter() - started, images


def endless(loader: Iterable[Batch]) -> Iterator[Batch]:
    while True:
        yield from loader


def bench_method(method: str, prepared: Path, args: argparse.Namespace, device: torch.device) -> list[dict]:
    model = model_params(method, args.image_size)
    loader = make_loader(prepared, "train", loader_params(args.image_size, {"num_threads": args.threads, "backend": args.backend}),
                         args.batch_size, train=True, device=device)
    # The detector's host sync every 50 steps is part of the product's step; keep it.
    train = train_params(args.batch_size, {"compile": args.compile})
    session = TrainingSession(model, train, loader.manifest.split("train").count, device)
    batches = endless(loader)
    resident = next(batches)
    resident = {key: value.to(device) for key, value in resident.items()}
    for _ in range(args.warmup):  # allocator, cuDNN autotuning, compilation
        session.train_step(resident)
    flops = flops_per_image(session, resident, args.batch_size)
    peak = peak_tflops(device, args.peak_tflops)

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
            "mfu": round(flops * rate / (peak * 1e12), 4) if peak else None,
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
    parser.add_argument("--backend", default="auto", choices=["auto", "dali", "nvjpeg", "torch"])
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the networks' blocks")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--data", type=Path, help="a pix2pix-layout source folder to prepare (e.g. the facades set)")
    parser.add_argument("--prepared", type=Path, default=None, help="a prepared facades folder to reuse")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.data is None and args.prepared is None:
        parser.error("give --data (a folder to prepare) or --prepared")
    device = torch.device(args.device)
    print(json.dumps({"machine": platform.node(), "cpu_count": torch.get_num_threads(), "torch": torch.__version__,
                      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}))
    with tempfile.TemporaryDirectory() as scratch:
        prepared = args.prepared or prepare_facades(args.data, Path(scratch) / "facades", args.image_size)
        for method in args.methods:
            bench_method(method, prepared, args, device)


if __name__ == "__main__":
    main()
