"""The loaders: prepared shards -> `Batch`es, with NVIDIA DALI, nvJPEG through torchvision, or plain PyTorch.

The backends give the same batches up to JPEG decoder differences:
- Training: resize the prepared image_size images to image_size x loader.load_scale, one
  random image_size crop and one coin flip per pair, drawn once and applied to source and
  target alike; `crop` and `flip` say what was drawn.
- Evaluation: the images as prepared, crop (0, 0), no flip, every sample once, in index order.
- Ranks: rank r of W owns the samples with index in [r*N//W, (r+1)*N//W), the same contiguous
  split DALI's reader makes with shard_id=r, num_shards=W. Ownership is fixed across epochs
  (only the order within a rank changes), so per-sample state such as ATME's memory can live on
  the rank that owns the sample.
- `len()` is the number of batches per epoch and is the same on every rank in training:
  (N // W) // batch_size, dropping the remainder, because a rank that ran one more step than
  the others would hang DDP.
"""

import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from components.config.data import LoaderParams
from components.data.batch import Batch
from components.data.integrity import DataError, dali_index_text, diagnose_shard, read_tar_samples
from components.data.manifest import Manifest, ShardEntry, SplitManifest, load_manifest
from components.data.shard_cache import GIB, Pin, ShardCache, ShardSource, default_cache_dir
from components.data.tar_safety import check_tar_members
from components.object_store import s3_client

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


@dataclass(frozen=True)
class LocalShard:
    """A shard this rank reads: its verified local file, its manifest entry, and the name users know it by."""

    path: Path
    entry: ShardEntry
    label: str  # the shard as the manifest locates it (local path or s3:// URI), for messages
    owned: range  # the dataset indices of this shard the rank reads


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


def shard_cache(loader: LoaderParams) -> ShardCache:
    """The node-local shard cache the loader params name (resolved on the machine that reads)."""
    root = Path(loader.cache_dir).expanduser() if loader.cache_dir else default_cache_dir()
    return ShardCache(root, int(loader.cache_max_gib * GIB))


def _diagnosis(manifest: Manifest, split: str, split_manifest: SplitManifest, entry: ShardEntry
               ) -> Callable[[Path, str], str]:
    samples = split_manifest.samples[entry.first_index : entry.first_index + entry.count]

    def diagnose(path: Path, actual_sha256: str) -> str:
        return diagnose_shard(path, manifest.member_location(entry.tar), split, entry, samples, entry.sha256,
                              actual_sha256)

    return diagnose


def verified_shards(manifest: Manifest, split: str, owned: range, cache: ShardCache,
                    client: Any = None) -> tuple[list[LocalShard], Pin]:
    """The shards holding samples of `owned`, each a verified local file (S3 ones fetched into the
    cache), and the pin that keeps them in the cache while the caller holds it.

    Raises DataError naming the shard and sample when one does not match the manifest.
    """
    split_manifest = manifest.split(split)
    entries = [
        entry for entry in split_manifest.shards
        if entry.first_index < owned.stop and entry.first_index + entry.count > owned.start
    ]
    sources = [
        ShardSource(manifest.member_location(entry.tar), entry.sha256, _diagnosis(manifest, split, split_manifest, entry))
        for entry in entries
    ]
    pin = cache.pin(entry.sha256 for entry in entries)
    paths = cache.get(sources, lambda: client or s3_client())
    shards = []
    for entry, source, path in zip(entries, sources, paths):
        check_tar_members(path)
        first, stop = max(owned.start, entry.first_index), min(owned.stop, entry.first_index + entry.count)
        shards.append(LocalShard(path, entry, source.location, range(first, stop)))
    return shards, pin


def write_dali_indices(shards: list[LocalShard], folder: Path) -> list[Path]:
    """One DALI index per shard listing only the rank's samples of it, so DALI reads exactly the rank's share."""
    paths = []
    for number, shard in enumerate(shards):
        samples = read_tar_samples(shard.path)
        if len(samples) != shard.entry.count:
            raise DataError(f"{shard.label}: holds {len(samples)} samples, the manifest lists {shard.entry.count}")
        start = shard.owned.start - shard.entry.first_index
        path = folder / f"{number:06d}.idx"
        path.write_text(dali_index_text(samples[start : start + len(shard.owned)]))
        paths.append(path)
    return paths


def make_loader(
    data: Path | str,
    split: str,
    loader: LoaderParams,
    batch_size: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    expected_checksum: str | None = None,
    client: Any = None,
) -> PairLoader:
    """A loader over one split of a prepared data set.

    data: the data set's folder or manifest.json, local or s3://bucket/prefix. train: augment,
    shuffle and drop the last partial batch. rank/world_size: this process's share (see the
    module doc). device: where the batch tensors end up; with DALI on CUDA decoding runs on
    that GPU. expected_checksum: the manifest checksum the caller started from; a data set
    rewritten since then is a DataError. client: the boto3 client for S3 (default: boto3's
    standard configuration).
    Only the shards holding this rank's samples are read; each is verified against the
    manifest's SHA-256 first (once per node, see shard_cache.py) and its tar headers checked
    (no absolute paths, no '..'). A damaged shard raises DataError naming shard and sample.
    """
    manifest = load_manifest(data, client)
    if expected_checksum is not None and manifest.checksum != expected_checksum:
        raise DataError(
            f"{manifest.file_location()}: the data set changed since this job started (manifest checksum "
            f"{manifest.checksum[:12]}, the job was started on {expected_checksum[:12]}); start the job again"
        )
    count = manifest.split(split).count
    if batch_size < 1:
        raise LoaderError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is not in 0..{world_size - 1}")
    if count == 0:
        raise LoaderError(f"{manifest.location}: split {split!r} has no samples")
    if batches_per_epoch(count, batch_size, train, rank, world_size) == 0:
        raise LoaderError(
            f"{manifest.location}: split {split!r} has {count} samples: {world_size} rank(s) x batch_size {batch_size} "
            "needs more for even one training batch per rank; lower batch_size"
        )
    backend = resolve_backend(loader.backend, device)
    owned = owned_indices(count, rank, world_size)
    shards, pin = verified_shards(manifest, split, owned, shard_cache(loader), client)
    if backend == "dali":
        from components.data.dali_loader import DaliPairLoader

        index_folder = tempfile.TemporaryDirectory(prefix="pairgan-dali-index-")
        indices = write_dali_indices(shards, Path(index_folder.name))
        return DaliPairLoader(manifest, split, shards, indices, index_folder, pin, loader, batch_size, train, rank,
                              world_size, seed, device)
    if backend == "nvjpeg":
        from components.data.nvjpeg_loader import NvjpegPairLoader

        return NvjpegPairLoader(manifest, split, shards, pin, loader, batch_size, train, rank, world_size, seed, device)
    from components.data.torch_loader import TorchPairLoader

    return TorchPairLoader(manifest, split, shards, pin, loader, batch_size, train, rank, world_size, seed, device)
