"""The plain PyTorch backend: webdataset reads the shards, Pillow decodes, a thread pool runs the augmentation.

For machines where DALI cannot be installed. Same outputs and rank split as the DALI backend.
Random draws come from a generator seeded by (seed, epoch, sample index), so a run is
reproducible whatever the thread scheduling.
"""

import io
import random
import struct
import tarfile
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from components.config.data import LoaderParams
from components.data.batch import Batch
from components.data.integrity import DataError
from components.data.loaders import Backend, LocalShard, batches_per_epoch, owned_indices
from components.data.manifest import Manifest
from components.data.shard_cache import Pin


def sample_index(sample: dict) -> int:
    return struct.unpack("<q", sample["index"])[0]


class TorchPairLoader:
    """A `PairLoader` on webdataset + Pillow. One `iter()` is one epoch of exactly `len()` batches."""

    backend: Backend = "torch"

    def __init__(
        self, manifest: Manifest, split: str, shards: list[LocalShard], pin: Pin, loader: LoaderParams,
        batch_size: int, train: bool, rank: int, world_size: int, seed: int, device: torch.device,
    ):
        self.manifest = manifest
        split_manifest = manifest.split(split)
        self.owned = owned_indices(split_manifest.count, rank, world_size)
        self._length = batches_per_epoch(split_manifest.count, batch_size, train, rank, world_size)
        # the verified local files of the shards holding some of this rank's samples
        self._urls = [str(shard.path) for shard in shards]
        self._labels = {str(shard.path): shard.label for shard in shards}
        self._split = split
        self._pin = pin  # keeps the cache entries in place while the loader lives
        self._loader = loader
        self._batch_size = batch_size
        self._train = train
        self._seed = seed
        self._rank = rank
        self._device = device
        self._image_size = manifest.image_size
        self._epoch = 0

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Start the next `iter()` at this epoch (a resumed run picks up the same random draws)."""
        self._epoch = epoch

    def _samples(self, epoch: int) -> Iterator[dict]:
        dataset = wds.WebDataset(
            self._urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False,
        ).select(lambda sample: sample_index(sample) in self.owned)
        if self._train:
            buffer = self._loader.shuffle_buffer
            dataset = dataset.shuffle(buffer, initial=buffer, rng=random.Random(f"{self._seed}/{self._rank}/{epoch}"))
        return iter(dataset)

    def _augment(self, sample: dict, epoch: int) -> tuple[torch.Tensor, torch.Tensor, int, bool, tuple[int, int]]:
        loader, index = self._loader, sample_index(sample)
        size = self._image_size  # the one image size the data was prepared at
        resize_to = loader.load_size_for(size) if self._train else size
        top = left = 0
        flip = False
        if self._train:
            draw = np.random.default_rng([self._seed, epoch, index])
            top, left = (int(v) for v in draw.integers(0, resize_to - size + 1, size=2))
            flip = loader.flip and bool(draw.random() < 0.5)
        halves = []
        for member in ("src.jpg", "tgt.jpg"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    image = Image.open(io.BytesIO(sample[member])).convert("RGB")
            except (OSError, SyntaxError, ValueError, KeyError, Image.DecompressionBombWarning) as error:
                shard = self._labels.get(sample.get("__url__"), sample.get("__url__"))
                raise DataError(f"{shard}, sample {self._split}/{sample.get('__key__')} (index {index}): "
                                f"{member} does not decode ({type(error).__name__}: {error})") from None
            if resize_to != self._image_size:
                image = image.resize((resize_to, resize_to), Image.BILINEAR)
            array = np.array(image)[top : top + size, left : left + size]
            if flip:
                array = array[:, ::-1]
            halves.append(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(127.5).sub_(1.0))
        return halves[0], halves[1], index, flip, (top, left)

    def _collate(self, items: list) -> Batch:
        pin = self._device.type == "cuda"
        sources, targets, indices, flips, crops = zip(*items)

        def move(tensor: torch.Tensor) -> torch.Tensor:
            return (tensor.pin_memory() if pin else tensor).to(self._device, non_blocking=pin)

        return Batch(
            source=move(torch.stack(sources)),
            target=move(torch.stack(targets)),
            index=move(torch.tensor(indices, dtype=torch.int64)),
            flip=move(torch.tensor(flips, dtype=torch.bool)),
            crop=move(torch.tensor(crops, dtype=torch.int64)),
        )

    def _next_sample(self, samples: Iterator[dict]) -> dict | None:
        try:
            return next(samples, None)
        except (tarfile.TarError, OSError, ValueError, KeyError, struct.error) as error:
            shards = ", ".join(self._labels.values())
            raise DataError(f"{shards}: cannot read split {self._split!r} ({type(error).__name__}: {error})") from None

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._epoch
        self._epoch += 1
        in_flight = self._batch_size * self._loader.prefetch
        produced, items = 0, []
        with ThreadPoolExecutor(max_workers=self._loader.num_threads) as pool:
            pending: deque = deque()
            samples = self._samples(epoch)
            while produced < self._length:
                while len(pending) < in_flight:
                    sample = self._next_sample(samples)
                    if sample is None:
                        break
                    pending.append(pool.submit(self._augment, sample, epoch))
                if not pending:
                    break
                items.append(pending.popleft().result())
                if len(items) == self._batch_size:
                    produced += 1
                    yield self._collate(items)
                    items = []
            if items and not self._train:
                yield self._collate(items)  # evaluation keeps the last partial batch
            for future in pending:
                future.cancel()
