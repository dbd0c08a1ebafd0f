"""Training throughput per method: images/s, step time, peak memory and model-FLOPs utilisation.

Each method runs the real training step (`TrainingSession.train_step`: every phase and the
method's after_step) at the reference architecture of its params/examples/*-reference.yaml
preset (pix2pix U-Net ngf 64 and PatchGAN ndf 64 with batch norm; ATME and DDGAN DDPM U-Net
width 64, multipliers 1-2-4-8, ATME's attention at every level, as the references), in two ways:
  resident: one batch kept on the device, stepped repeatedly (the compute ceiling);
  loader:   batches from the real loader over a prepared pix2pix-layout set (decode + augmentation).

    python bench/train_throughput.py --data DIR                        # GPU: 256 px, batch 32, every method
    python bench/train_throughput.py --data DIR --image-size 64 --batch-size 4 --steps 5 --methods pix2pix atme  # CPU
    python bench/train_throughput.py --prepared DIR                    # reuse a prepared folder

FLOPs are counted once per method with torch.utils.flop_counter.FlopCounterMode over one whole
eager training step (forward and backward of every phase; the second step, as the first runs
lazy regularisation), divided by the batch size. MFU is
(FLOP per image x images/s) / the device's peak dense bf16 rate (--peak-tflops; known for
H100/H200). The params are the shipped params/*.yaml (performance switches as shipped, auto;
--compile turns regional compile on) with the presets' networks; the loader resizes to
286/256 of the image size before its crop. Params, data and measurement: bench/workloads.py.
Run by hand; results go to docs/benchmarks.md with the machine and the command.
"""

import argparse
import itertools
import json
import platform
import tempfile
from pathlib import Path

import torch
import workloads

from components.data.loaders import make_loader
from components.training.loop import TrainingSession


def bench_method(method: str, prepared: Path, args: argparse.Namespace, device: torch.device,
                 cache_dir: Path) -> list[dict]:
    loader_params = workloads.loader_params({"num_threads": args.threads, "backend": args.backend,
                                             "cache_dir": str(cache_dir)})
    loader = make_loader(prepared, "train", loader_params, args.batch_size, train=True, device=device)
    image_size = loader.manifest.image_size
    model = workloads.model_params(method, image_size, load_scale=loader_params.load_scale)
    # The detector's host sync every 50 steps is part of the product's step; keep it.
    count = loader.manifest.split("train").count
    batches = workloads.endless(loader)
    resident = {key: value.to(device) for key, value in next(batches).items()}
    # compiled code hides its operations from the FLOP counter: count on an eager session, at its
    # second step (the first runs lazy regularisation, DDGAN's R1, which recurs every r1_interval steps)
    eager = TrainingSession(model, workloads.train_params(args.batch_size, {"compile": False}), count, device)
    eager.train_step(resident)
    flops = workloads.flops_per_image(eager, resident, args.batch_size)
    del eager
    session = TrainingSession(model, workloads.train_params(args.batch_size, {"compile": True} if args.compile else None), count, device)
    for _ in range(args.warmup):  # allocator, cuDNN autotuning, compilation
        session.train_step(resident)
    peak = workloads.peak_tflops(device, args.peak_tflops)

    rows = []
    for mode in args.modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        source = itertools.repeat(resident) if mode == "resident" else batches
        seconds, images = workloads.time_steps(session, source, args.steps, device)
        rate = images / seconds
        peak_gib = workloads.peak_memory_gib(device)
        rows.append({
            "method": method, "mode": mode, "image_size": image_size, "batch_size": args.batch_size,
            "images_per_s": round(rate, 2), "step_ms": round(1000 * seconds / args.steps, 1),
            "peak_memory_gib": round(peak_gib, 2), "peak_memory_per_image_gib": round(peak_gib / args.batch_size, 3),
            "train_gflop_per_image": round(flops / 1e9, 2),
            "achieved_tflops": round(flops * rate / 1e12, 3),
            "mfu": round(flops * rate / (peak * 1e12), 4) if peak else None,
            "switches": session.switches.summary(),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["pix2pix", "atme", "ddgan"],
                        choices=list(workloads.REFERENCE_PRESETS))
    parser.add_argument("--modes", nargs="+", default=["resident", "loader"], choices=["resident", "loader"])
    parser.add_argument("--image-size", type=int, default=256, help="the size --data is prepared at")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="loader decode threads")
    parser.add_argument("--backend", default="auto", choices=["auto", "dali", "nvjpeg", "torch"])
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the networks' blocks")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--data", type=Path, help="a pix2pix-layout source folder to prepare (e.g. the facades set)")
    parser.add_argument("--prepared", type=Path, default=None, help="a prepared folder to reuse (its image size is used)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.data is None and args.prepared is None:
        parser.error("give --data (a folder to prepare) or --prepared")
    device = torch.device(args.device)
    print(json.dumps({"machine": platform.node(), "cpu_count": torch.get_num_threads(), "torch": torch.__version__,
                      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}))
    with tempfile.TemporaryDirectory(prefix="pairgan-bench-") as scratch:
        prepared = args.prepared or workloads.prepare_pix2pix_folder(args.data, Path(scratch) / "prepared", args.image_size)
        for method in args.methods:
            bench_method(method, prepared, args, device, Path(scratch) / "shard-cache")


if __name__ == "__main__":
    main()
