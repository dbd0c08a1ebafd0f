"""The loaders: prepared shards -> `Batch`es, with NVIDIA DALI, nvJPEG through torchvision, or plain PyTorch.

The backends give the same batches up to JPEG decoder differences:
- Training: resize to load_size, one random crop_size crop and one coin flip per pair, drawn
  once and applied to source and target alike; `crop` and `flip` say what was drawn.
- Evaluation: resize to crop_size, crop (0, 0), no flip, every sample once, in index order.
- Ranks: rank r of W owns the samples with index in [r*N//W, (r+1)*N//W), the same contiguous
  split DALI's reader makes with shard_id=r, num_shards=W. Ownership is fixed across epochs
  (only the order within a rank changes), so per-sample state such as ATME's memory can live on
  the rank that owns the sample.
- `len()` is the number of batches per epoch and is the same on every rank in training:
  (N // W) // batch_size, dropping the remainder, because a rank that ran one more step than
  the others would hang DDP.
"""

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Protocol

import torch

from components.config.data import LoaderParams
from components.data.batch import Batch
from components.data.manifest import Manifest, load_manifest
from components.data.tar_safety import check_tar_members

Backend = Literal["dali", "nvjpeg", "torch"]


class PairLoader(Protocol):
    """An iterable of `Batch` with a fixed number of batches per epoch; each `iter()` is one epoch."""

    backend: Backend
    manifest: Manifest
    owned: range  # the sample indices this rank reads

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int) -> None:
        """Make the next `iter()` epoch `epoch`: its random draws depend on (seed, rank, epoch)
        only, so a resumed run repeats exactly the draws of the epoch it resumes at."""


class LoaderError(ValueError):
    """The loader cannot be built for this split, batch size and world size."""


def owned_indices(count: int, rank: int, world_size: int) -> range:
    """The samples rank `rank` reads: DALI's contiguous shard split, reproduced for the torch backend."""
    return range(count * rank // world_size, count * (rank + 1) // world_size)


def batches_per_epoch(count: int, batch_size: int, train: bool, rank: int, world_size: int) -> int:
    if train:
        return (count // world_size) // batch_size
    return math.ceil(len(owned_indices(count, rank, world_size)) / batch_size)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def torchvision_available() -> bool:
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: Literal["auto", "dali", "nvjpeg", "torch"], device: torch.device) -> Backend:
    """auto: DALI when it can be imported; else nvJPEG on a CUDA device when torchvision can; else torch."""
    cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        if dali_available():
            return "dali"
        return "nvjpeg" if cuda and torchvision_available() else "torch"
    if requested == "dali" and not dali_available():
        raise LoaderError("loader.backend is dali but nvidia-dali cannot be imported; install it or use backend: torch")
    if requested == "nvjpeg" and not cuda:
        raise LoaderError(f"loader.backend is nvjpeg, which decodes on a CUDA device, but this loader's device is "
                          f"{device}; use backend: torch or dali")
    if requested == "nvjpeg" and not torchvision_available():
        raise LoaderError("loader.backend is nvjpeg but torchvision cannot be imported; install the torchvision "
                          "build matching your torch, or use backend: dali or torch")
    return requested


def make_loader(
    manifest_path: Path | str,
    split: str,
    loader: LoaderParams,
    batch_size: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
) -> PairLoader:
    """A loader over one split of a prepared data set.

    manifest_path: manifest.json or the folder holding it. train: augment, shuffle and drop
    the last partial batch. rank/world_size: this process's share (see the module doc).
    device: where the batch tensors end up; with DALI on CUDA decoding runs on that GPU.
    Every shard's tar headers are checked (no absolute paths, no '..') before anything is read.
    """
    manifest = load_manifest(manifest_path)
    count = manifest.split(split).count
    if batch_size < 1:
        raise LoaderError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is not in 0..{world_size - 1}")
    if count == 0:
        raise LoaderError(f"{manifest.root}: split {split!r} has no samples")
    if batches_per_epoch(count, batch_size, train, rank, world_size) == 0:
        raise LoaderError(
            f"{manifest.root}: split {split!r} has {count} samples: {world_size} rank(s) x batch_size {batch_size} "
            "needs more for even one training batch per rank; lower batch_size"
        )
    for path in manifest.shard_paths(split):
        check_tar_members(path)
    backend = resolve_backend(loader.backend, device)
    if backend == "dali":
        from components.data.dali_loader import DaliPairLoader

        return DaliPairLoader(manifest, split, loader, batch_size, train, rank, world_size, seed, device)
    if backend == "nvjpeg":
        from components.data.nvjpeg_loader import NvjpegPairLoader

        owned = owned_indices(count, rank, world_size)
        shards = [manifest.root / shard.tar for shard in manifest.split(split).shards
                  if shard.first_index < owned.stop and shard.first_index + shard.count > owned.start]
        return NvjpegPairLoader(manifest, split, shards, loader, batch_size, train, rank, world_size, seed, device)
    from components.data.torch_loader import TorchPairLoader

    return TorchPairLoader(manifest, split, loader, batch_size, train, rank, world_size, seed, device)
