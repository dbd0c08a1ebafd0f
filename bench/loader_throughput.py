"""Loader throughput: pairs/s of each loader backend on the facades set at 286 -> 256 with flip, batch 32.

    python bench/loader_throughput.py                    # prepare ../shared/data/facades, time dali and torch
    python bench/loader_throughput.py --gpu              # also GPU decoding (DALI mixed, torchvision nvJPEG)
    python bench/loader_throughput.py --prepared DIR     # reuse a prepared folder (holds manifest.json)

Run by hand; results go to docs/benchmarks.md with the machine and the command.
"""

import argparse
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import torch

PARAMS = Path(__file__).resolve().parents[1] / "params"


def data_params(args: argparse.Namespace, backend: str = "auto"):
    """params/data.yaml with this run's source, size, load size and loader settings."""
    from components.config import read_yaml_mapping, validate_params, with_overrides
    from components.config.data import DataParams

    overrides = {"source": {"kind": "pix2pix", "path": str(args.data.resolve()), "direction": "BtoA"},
                 "image_size": args.image_size,
                 "loader": {"backend": backend, "load_scale": args.load_size / args.image_size, "flip": True,
                            "num_threads": args.threads, "prefetch": 2}}
    return validate_params(with_overrides(read_yaml_mapping(PARAMS / "data.yaml"), overrides), DataParams,
                           PARAMS / "data.yaml", context={"check_source_path": False})


def prepare_facades(args: argparse.Namespace, out: Path) -> Path:
    from components.data.sources import open_source
    from components.data.writer import prepare_dataset

    params = data_params(args)
    started = time.perf_counter()
    result = prepare_dataset(params, open_source(params, Path.cwd()), out)
    print(f"prepare: {result.new_pairs} pairs in {time.perf_counter() - started:.1f} s")
    return out


def time_loader(prepared: Path, backend: str, args: argparse.Namespace, device: torch.device) -> float:
    from components.data.loaders import make_loader

    params = data_params(args, backend).loader
    loader = make_loader(prepared, "train", params, batch_size=args.batch_size, train=True, device=device)
    for _ in loader:  # warm-up epoch: pipeline build, page cache, thread start
        pass
    pairs, started = 0, time.perf_counter()
    for _ in range(args.epochs):
        for batch in loader:
            pairs += batch["source"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return pairs / (time.perf_counter() - started)


def time_nvjpeg(prepared: Path, args: argparse.Namespace) -> float:
    """torchvision nvJPEG decode on the GPU plus the same paired resize/crop/flip, in torch ops.
    Reads the JPEG bytes from the shards once (plain tarfile, so it runs where DALI is missing)."""
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    manifest = json.loads((prepared / "manifest.json").read_text())
    blobs: list[torch.Tensor] = []
    for shard in manifest["splits"]["train"]["shards"]:
        with tarfile.open(prepared / shard["tar"]) as tar:
            for member in tar:
                if member.name.endswith((".src.jpg", ".tgt.jpg")):
                    blobs.append(torch.frombuffer(bytearray(tar.extractfile(member).read()), dtype=torch.uint8))
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    step = 2 * args.batch_size
    offset = args.load_size - args.image_size

    def one_pass() -> int:
        pairs = 0
        for start in range(0, len(blobs) - step + 1, step):
            images = torch.stack(decode_jpeg(blobs[start : start + step], device=device)).float()
            images = F.interpolate(images, size=(args.load_size, args.load_size), mode="bilinear", antialias=True)
            images = images.view(args.batch_size, 2, 3, args.load_size, args.load_size)  # (src, tgt) together
            top = torch.randint(0, offset + 1, (args.batch_size,), device=device, generator=generator)
            left = torch.randint(0, offset + 1, (args.batch_size,), device=device, generator=generator)
            rows = (top[:, None] + torch.arange(args.image_size, device=device))[:, None, None, :, None]
            cols = (left[:, None] + torch.arange(args.image_size, device=device))[:, None, None, None, :]
            flip = torch.rand(args.batch_size, device=device, generator=generator) < 0.5
            cols = torch.where(flip[:, None, None, None, None], cols.flip(-1), cols)
            batch_index = torch.arange(args.batch_size, device=device)[:, None, None, None, None]
            crops = images[batch_index, torch.arange(2, device=device)[None, :, None, None, None],
                           torch.arange(3, device=device)[None, None, :, None, None], rows, cols]
            crops.div_(127.5).sub_(1.0)
            pairs += args.batch_size
        return pairs

    one_pass()  # warm-up: nvJPEG handles, kernels
    torch.cuda.synchronize()
    pairs, started = 0, time.perf_counter()
    for _ in range(args.epochs):
        pairs += one_pass()
    torch.cuda.synchronize()
    return pairs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/facades"), help="pix2pix-layout source")
    parser.add_argument("--prepared", type=Path, help="a prepared folder to reuse instead of preparing --data")
    parser.add_argument("--image-size", type=int, default=256, help="prepared size, and the training crop's")
    parser.add_argument("--load-size", type=int, default=286, help="training resize before the crop")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument("--backends", nargs="+", default=["dali", "torch"], choices=["dali", "torch"])
    parser.add_argument("--gpu", action="store_true", help="also time GPU decoding when CUDA is present")
    args = parser.parse_args()

    print(f"machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    with tempfile.TemporaryDirectory(prefix="pairgan-bench-") as scratch:
        prepared = args.prepared or prepare_facades(args, Path(scratch) / "prepared")
        settings = f"load {args.load_size} crop {args.image_size} flip, batch {args.batch_size}, {args.threads} threads"
        for backend in args.backends:
            rate = time_loader(prepared, backend, args, torch.device("cpu"))
            print(f"{backend} (CPU decode, {settings}): {rate:.0f} pairs/s")
        if args.gpu:
            if not torch.cuda.is_available():
                print("no CUDA device: GPU figures pending")
                return
            from components.data.loaders import dali_available

            if dali_available():
                rate = time_loader(prepared, "dali", args, torch.device("cuda"))
                print(f"dali (GPU mixed decode, {settings}): {rate:.0f} pairs/s")
            else:
                print("dali on GPU not measured: nvidia.dali is not installed here")
            print(f"torchvision nvJPEG (GPU decode + paired augmentation, {settings}): {time_nvjpeg(prepared, args):.0f} pairs/s")


if __name__ == "__main__":
    main()
