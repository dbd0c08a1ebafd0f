"""The GPU-decoding backend without DALI: JPEG bytes read straight from the shards, decoded by
nvJPEG (`torchvision.io.decode_jpeg(..., device="cuda")`), resized, cropped and flipped on the GPU.

Same `Batch`es, rank split and batch count as the DALI and torch backends (loaders.py). The
crop and flip of sample i in epoch e are drawn exactly as the torch backend draws them (a
generator seeded by (seed, epoch, i)), so the two backends augment a sample alike; the
epoch's order is a permutation of the rank's samples seeded by (seed, rank, epoch).

Two threads keep the GPU fed: a reader pulls each batch's JPEG bytes from the shards (tar
member offsets are indexed once, then read with `os.pread`) and draws its crops and flips; a
decoder decodes and augments the batch on a CUDA stream of its own, `prefetch` batches ahead,
so decoding overlaps the training step. The consumer's stream waits on an event per batch.
"""

import io
import os
import queue
import struct
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from components.config.data import LoaderParams
from components.data.batch import Batch
from components.data.loaders import Backend, LoaderError, LocalShard, batches_per_epoch, owned_indices
from components.data.manifest import Manifest
from components.data.shard_cache import Pin

# blobs (1-D uint8 CPU tensors, one JPEG each) -> C x H x W uint8 RGB images on `device`
Decoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def nvjpeg_decode(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One batched nvJPEG decode on the GPU (or libjpeg-turbo on the CPU) through torchvision."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)


def pil_decode(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Pillow decoding, the stand-in where torchvision is not installed (tests, the GPU check's --cpu mode)."""
    images = []
    for blob in blobs:
        array = np.asarray(Image.open(io.BytesIO(blob.numpy().tobytes())).convert("RGB"))
        images.append(torch.from_numpy(array.copy()).permute(2, 0, 1).to(device))
    return images


@dataclass(frozen=True)
class SampleLocation:
    """Where one sample's two JPEGs are: shard number and (offset, size) of each member's bytes."""

    key: str
    shard: int
    source: tuple[int, int]
    target: tuple[int, int]


def index_shards(paths: list[Path], owned: range) -> dict[int, SampleLocation]:
    """Dataset index -> location for every sample of `owned` in these shards (tar headers and the
    8-byte `.index` members are read; no image is). Raises LoaderError for a sample that lacks a
    member or appears twice, and for owned samples no shard holds."""
    found: dict[int, SampleLocation] = {}
    for number, path in enumerate(paths):
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                key, _, suffix = member.name.partition(".")
                members.setdefault(key, {})[suffix] = member
            for key, parts in members.items():
                missing = [suffix for suffix in ("src.jpg", "tgt.jpg", "index") if suffix not in parts]
                if missing:
                    raise LoaderError(f"{path}: sample {key!r} has no {', '.join(missing)} member")
                (index,) = struct.unpack("<q", archive.extractfile(parts["index"]).read())
                if index not in owned:
                    continue
                if index in found:
                    raise LoaderError(f"{path}: sample {key!r} repeats dataset index {index} (already in {found[index].key!r})")
                source, target = parts["src.jpg"], parts["tgt.jpg"]
                found[index] = SampleLocation(key, number, (source.offset_data, source.size), (target.offset_data, target.size))
    absent = [index for index in owned if index not in found]
    if absent:
        raise LoaderError(f"{len(absent)} sample(s) of this rank are in none of its shards (first: index {absent[0]})")
    return found


def augmentation_draws(seed: int, epoch: int, indices: list[int], resize_to: int, crop_size: int,
                       flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N x 2 crop corners (top, left), N flips) as the torch backend draws them for these samples."""
    crops = np.zeros((len(indices), 2), dtype=np.int64)
    flips = np.zeros(len(indices), dtype=bool)
    for row, index in enumerate(indices):
        draw = np.random.default_rng([seed, epoch, index])
        crops[row] = draw.integers(0, resize_to - crop_size + 1, size=2)
        flips[row] = flip and bool(draw.random() < 0.5)
    return crops, flips


def resize_crop_flip(halves: torch.Tensor, resize_to: int, crops: torch.Tensor, flips: torch.Tensor,
                     crop_size: int) -> torch.Tensor:
    """2 x N x C x H x W uint8 (sources, targets) -> 2 x N x C x crop_size x crop_size float32 in [-1, 1].

    Both halves of pair i are resized to resize_to, cropped at crops[i] = (top, left) and
    mirrored left-right where flips[i]: the same window and flip for source and target.
    """
    sides, count, channels, height, width = halves.shape
    images = halves.reshape(sides * count, channels, height, width).float()
    if (height, width) != (resize_to, resize_to):
        images = F.interpolate(images, size=(resize_to, resize_to), mode="bilinear", align_corners=False,
                               antialias=resize_to < min(height, width))
    images = images.view(sides, count, channels, resize_to, resize_to)
    offsets = torch.arange(crop_size, device=images.device)
    rows = crops[:, 0, None] + offsets
    columns = crops[:, 1, None] + offsets
    columns = torch.where(flips[:, None], columns.flip(-1), columns)
    images = images.gather(3, rows[None, :, None, :, None].expand(sides, count, channels, crop_size, resize_to))
    images = images.gather(4, columns[None, :, None, None, :].expand(sides, count, channels, crop_size, crop_size))
    return images.div_(127.5).sub_(1.0)


@dataclass
class _HostBatch:
    indices: list[int]
    blobs: list[torch.Tensor]  # the sources, then the targets
    crops: np.ndarray
    flips: np.ndarray


_DONE = object()


class NvjpegPairLoader:
    """A `PairLoader` decoding on the GPU with nvJPEG. One `iter()` is one epoch of exactly `len()` batches.

    shards: the verified local shards holding this rank's samples, kept in the node's cache by
    `pin` while the loader lives. decode: the JPEG decoder (nvJPEG through torchvision by
    default; `pil_decode` where torchvision is missing).
    """

    backend: Backend = "nvjpeg"

    def __init__(
        self, manifest: Manifest, split: str, shards: list[LocalShard], pin: Pin, loader: LoaderParams,
        batch_size: int, train: bool, rank: int, world_size: int, seed: int, device: torch.device,
        decode: Decoder = nvjpeg_decode,
    ):
        self.manifest = manifest
        count = manifest.split(split).count
        self.owned = owned_indices(count, rank, world_size)
        self._length = batches_per_epoch(count, batch_size, train, rank, world_size)
        self._paths = [shard.path for shard in shards]
        self._pin = pin
        self._image_size = manifest.image_size  # the one image size the data was prepared at
        self._load_size = loader.load_size_for(manifest.image_size)
        self._locations = index_shards(self._paths, self.owned)
        self._loader, self._batch_size, self._train = loader, batch_size, train
        self._seed, self._rank, self._epoch = seed, rank, 0
        self._device = torch.device(device)
        if self._device.type == "cuda" and self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._decode = decode

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Start the next `iter()` at this epoch (a resumed run picks up the same random draws)."""
        self._epoch = epoch

    def _batch_indices(self, epoch: int) -> list[list[int]]:
        owned, size = list(self.owned), self._batch_size
        if not self._train:
            return [owned[start : start + size] for start in range(0, len(owned), size)]
        order = np.random.default_rng([self._seed, self._rank, epoch]).permutation(owned).tolist()
        return [order[number * size : (number + 1) * size] for number in range(self._length)]

    def _read(self, indices: list[int], epoch: int, files: list[int]) -> _HostBatch:
        loader = self._loader
        locations = [self._locations[index] for index in indices]
        members = [(location.shard, location.source) for location in locations]
        members += [(location.shard, location.target) for location in locations]
        blobs = [
            torch.frombuffer(bytearray(os.pread(files[shard], size, offset)), dtype=torch.uint8)
            for shard, (offset, size) in members
        ]
        if self._train:
            crops, flips = augmentation_draws(self._seed, epoch, indices, self._load_size, self._image_size, loader.flip)
        else:
            crops, flips = np.zeros((len(indices), 2), dtype=np.int64), np.zeros(len(indices), dtype=bool)
        return _HostBatch(indices, blobs, crops, flips)

    def _to_device(self, host: _HostBatch) -> Batch:
        device = self._device
        images = self._decode(host.blobs, device)
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) != 1:
            keys = [self._locations[index].key for index in host.indices]
            raise LoaderError(f"images of one batch differ in size ({sorted(shapes)}); samples {keys}")
        halves = torch.stack(images).view(2, len(host.indices), *images[0].shape)
        crops = torch.from_numpy(host.crops).to(device)
        flips = torch.from_numpy(host.flips).to(device)
        resize_to = self._load_size if self._train else self._image_size
        augmented = resize_crop_flip(halves, resize_to, crops, flips, self._image_size)
        return Batch(
            source=augmented[0], target=augmented[1],
            index=torch.tensor(host.indices, dtype=torch.int64).to(device),
            flip=flips, crop=crops,
        )

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._epoch
        self._epoch += 1
        batches = self._batch_indices(epoch)
        stop = threading.Event()
        host_queue: queue.Queue = queue.Queue(maxsize=self._loader.prefetch)
        ready_queue: queue.Queue = queue.Queue(maxsize=self._loader.prefetch)
        cuda = self._device.type == "cuda"
        stream = torch.cuda.Stream(self._device) if cuda else None

        def put(target: queue.Queue, item: object) -> bool:
            while not stop.is_set():
                try:
                    target.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            files = [os.open(path, os.O_RDONLY) for path in self._paths]
            try:
                for indices in batches:
                    if not put(host_queue, self._read(indices, epoch, files)):
                        return
                put(host_queue, _DONE)
            except BaseException as error:  # handed to the consumer, which raises it
                put(host_queue, error)
            finally:
                for handle in files:
                    os.close(handle)

        def decode() -> None:
            try:
                if cuda:
                    torch.cuda.set_device(self._device)
                while not stop.is_set():
                    try:
                        item = host_queue.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if item is _DONE or isinstance(item, BaseException):
                        put(ready_queue, item)
                        return
                    if cuda:
                        with torch.cuda.stream(stream):
                            batch = self._to_device(item)
                            ready = torch.cuda.Event()
                            ready.record(stream)
                    else:
                        batch, ready = self._to_device(item), None
                    if not put(ready_queue, (batch, ready)):
                        return
            except BaseException as error:
                put(ready_queue, error)

        threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=decode, daemon=True)]
        for thread in threads:
            thread.start()
        try:
            for _ in batches:
                item = ready_queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _DONE:
                    break
                batch, ready = item
                if ready is not None:
                    consumer = torch.cuda.current_stream(self._device)
                    consumer.wait_event(ready)
                    for tensor in batch.values():
                        tensor.record_stream(consumer)  # made on the decoder's stream, used on this one
                yield batch
        finally:
            stop.set()
            for thread in threads:
                thread.join()
