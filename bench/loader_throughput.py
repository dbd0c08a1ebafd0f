"""Loader throughput: pairs/s of each loader backend on a pix2pix-layout set, resize to 286/256 of
the image size, random crop and flip, batch 32.

    python bench/loader_throughput.py --data DIR               # prepare DIR (e.g. facades), time dali and torch
    python bench/loader_throughput.py --data DIR --gpu         # also GPU decoding (DALI mixed, nvjpeg)
    python bench/loader_throughput.py --prepared DIR           # reuse a prepared folder (holds manifest.json)
    python bench/loader_throughput.py --data DIR --jpeg-chroma 4:4:4 4:2:0   # photos (targets) stored at 4:2:0

Run by hand; results go to docs/benchmarks.md with the machine and the command.
bench/gpu_check.py measures the GPU decoding without DALI in its `decode` section.
"""

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import workloads

from components.data.loaders import dali_available, make_loader, torchvision_available
from components.data.manifest import load_manifest
from components.data.writer import CHROMA_BEFORE_THE_PARAM


def time_loader(prepared: Path, backend: str, args: argparse.Namespace, device: torch.device, cache_dir: Path) -> float:
    params = workloads.loader_params({"backend": backend, "load_scale": args.load_scale, "flip": True,
                                      "num_threads": args.threads, "prefetch": 2, "cache_dir": str(cache_dir)})
    loader = make_loader(prepared, "train", params, batch_size=args.batch_size, train=True, device=device)
    for _ in loader:  # warm-up epoch: pipeline build, page cache, thread start
        pass
    pairs, started = 0, time.perf_counter()
    for _ in range(args.epochs):
        for batch in loader:
            pairs += batch["source"].shape[0]
    workloads.synchronize(device)
    return pairs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a pix2pix-layout source folder (e.g. the facades set)")
    parser.add_argument("--prepared", type=Path, help="a prepared folder to reuse instead of preparing --data")
    parser.add_argument("--image-size", type=int, default=256, help="the size --data is prepared at")
    parser.add_argument("--load-scale", type=float, default=workloads.REFERENCE_LOAD_SCALE,
                        help="training resize before the crop, x image size (default 286/256, the references')")
    parser.add_argument("--jpeg-chroma", nargs=2, metavar=("SOURCE", "TARGET"),
                        help="the chroma subsampling --data's sides are prepared with (default: params/data.yaml's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument("--backends", nargs="+", default=["dali", "torch"], choices=["dali", "torch"],
                        help="backends timed with CPU decoding")
    parser.add_argument("--gpu", action="store_true", help="also time GPU decoding when CUDA is present")
    args = parser.parse_args()
    if args.data is None and args.prepared is None:
        parser.error("give --data (a folder to prepare) or --prepared")

    print(f"machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    with tempfile.TemporaryDirectory(prefix="pairgan-bench-") as scratch:
        cache_dir = Path(scratch) / "shard-cache"
        if args.prepared is None:
            started = time.perf_counter()
            chroma = {"jpeg_chroma": dict(zip(("source", "target"), args.jpeg_chroma))} if args.jpeg_chroma else {}
            prepared = workloads.prepare_pix2pix_folder(args.data, Path(scratch) / "prepared", args.image_size, chroma)
            print(f"prepare: {args.data} in {time.perf_counter() - started:.1f} s")
        else:
            prepared = args.prepared
        manifest = load_manifest(prepared)
        chroma = manifest.params.get("jpeg_chroma", CHROMA_BEFORE_THE_PARAM)
        print(f"data: {manifest.split('train').count} train pairs, {workloads.shard_kib_per_pair(prepared):.1f} KiB "
              f"per pair in the shards, chroma source {chroma['source']}, target {chroma['target']}")
        settings = f"load scale {args.load_scale:.4g}, crop, flip, batch {args.batch_size}, {args.threads} threads"
        for backend in args.backends:
            rate = time_loader(prepared, backend, args, torch.device("cpu"), cache_dir)
            print(f"{backend} (CPU decode, {settings}): {rate:.0f} pairs/s")
        if args.gpu:
            if not torch.cuda.is_available():
                print("no CUDA device: GPU figures pending")
                return
            if dali_available():
                rate = time_loader(prepared, "dali", args, torch.device("cuda"), cache_dir)
                print(f"dali (GPU mixed decode, {settings}): {rate:.0f} pairs/s")
            else:
                print("dali on GPU not measured: nvidia.dali is not installed here")
            if torchvision_available():
                rate = time_loader(prepared, "nvjpeg", args, torch.device("cuda"), cache_dir)
                print(f"nvjpeg (torchvision nvJPEG decode + paired augmentation on the GPU, {settings}): {rate:.0f} pairs/s")
            else:
                print("nvjpeg not measured: torchvision is not installed here")


if __name__ == "__main__":
    main()
