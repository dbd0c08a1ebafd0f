"""The DALI backend: `fn.readers.webdataset` -> decode (GPU `mixed` on CUDA, CPU otherwise) -> paired augmentation.

The reader gets the rank's verified shard files and an index per shard listing only the
rank's samples (`loaders.write_dali_indices`), so it reads the rank's share and nothing else.
"""

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from components.config.data import LoaderParams
from components.data.batch import Batch
from components.data.integrity import DataError, diagnose_shard, file_sha256
from components.data.loaders import Backend, LocalShard, batches_per_epoch, owned_indices
from components.data.manifest import Manifest
from components.data.shard_cache import Pin

OUTPUTS = ["source", "target", "index", "flip", "crop"]


def build_pipeline(
    shards: list[LocalShard], indices: list[Path], image_size: int, loader: LoaderParams, batch_size: int,
    train: bool, pipeline_seed: int, device_id: int | None,
) -> Pipeline:
    """The DALI graph. Each random value is drawn once per sample and fed to both images'
    operators, which is what makes the crop and flip shared by source and target."""
    owned = sum(len(shard.owned) for shard in shards)
    out_size = image_size  # the one image size the data was prepared at
    resize_to = loader.load_size_for(out_size) if train else out_size
    pipe = Pipeline(
        batch_size=batch_size, num_threads=loader.num_threads, device_id=device_id,
        seed=pipeline_seed, prefetch_queue_depth=loader.prefetch,
    )
    with pipe:
        source, target, index = fn.readers.webdataset(
            paths=[str(shard.path) for shard in shards],
            index_paths=[str(path) for path in indices],
            ext=["src.jpg", "tgt.jpg", "index"],
            dtypes=[types.UINT8, types.UINT8, types.INT64],
            missing_component_behavior="error",
            # the indices list the rank's samples only: this reader's one shard is the rank's
            # share, the same every epoch (see loaders.py); shuffling happens inside it.
            shard_id=0, num_shards=1, stick_to_shard=True,
            random_shuffle=train,
            initial_fill=max(1, min(loader.shuffle_buffer, owned)),
            pad_last_batch=not train,
            name="reader",
        )
        if train:
            flip = fn.random.coin_flip(probability=0.5 if loader.flip else 0.0, dtype=types.INT32)
            crop = fn.random.uniform(values=list(range(resize_to - out_size + 1)), shape=[2], dtype=types.INT32)
        else:
            flip = fn.constant(idata=0, dtype=types.INT32)
            crop = fn.constant(idata=[0, 0], dtype=types.INT32)
        decoded = []
        for image in (source, target):
            image = fn.decoders.image(image, device="mixed" if device_id is not None else "cpu", output_type=types.RGB)
            if resize_to != image_size:
                image = fn.resize(image, size=[resize_to, resize_to], interp_type=types.INTERP_LINEAR, antialias=True)
            if resize_to != out_size:
                image = fn.slice(image, crop, fn.constant(idata=[out_size, out_size], dtype=types.INT32),
                                 axis_names="HW", normalized_anchor=False, normalized_shape=False)
            decoded.append(fn.crop_mirror_normalize(
                image, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3, std=[127.5] * 3, mirror=flip,
            ))
        pipe.set_outputs(decoded[0], decoded[1], index, flip, crop)
    return pipe


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The DALI pipeline seed of one rank's epoch (DALI takes a 32-bit seed)."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


class DaliPairLoader:
    """A `PairLoader` on DALI. One `iter()` is one epoch of exactly `len()` batches.

    A DALI pipeline cannot be re-seeded, so each epoch gets a pipeline of its own seeded by
    (seed, rank, epoch): an epoch's shuffle, crops and flips do not depend on how many epochs
    this process ran before, and a run resumed at epoch e draws what an uninterrupted run draws.
    """

    backend: Backend = "dali"

    def __init__(
        self, manifest: Manifest, split: str, shards: list[LocalShard], indices: list[Path],
        index_folder: tempfile.TemporaryDirectory, pin: Pin, loader: LoaderParams, batch_size: int, train: bool,
        rank: int, world_size: int, seed: int, device: torch.device,
    ):
        self.manifest = manifest
        count = manifest.split(split).count
        self.owned = owned_indices(count, rank, world_size)
        self._length = batches_per_epoch(count, batch_size, train, rank, world_size)
        self._device = device
        self._train, self._seed, self._rank, self._epoch = train, seed, rank, 0
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
        self._pipeline_args = (shards, indices, manifest.image_size, loader, batch_size, train)
        self._device_id = device_id
        self._shards, self._split = shards, split
        # held as long as the loader lives: the index files, and the cache entries it reads
        self._index_folder, self._pin = index_folder, pin

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Start the next `iter()` at this epoch (a resumed run picks up the same random draws)."""
        self._epoch = epoch

    def _data_error(self, error: Exception) -> DataError:
        """DALI's error, with the shard and sample named when a file changed since it was verified."""
        for shard in self._shards:
            actual = file_sha256(shard.path)
            if actual != shard.entry.sha256:
                samples = self.manifest.split(self._split).samples[
                    shard.entry.first_index : shard.entry.first_index + shard.entry.count]
                message = diagnose_shard(shard.path, shard.label, self._split, shard.entry, samples,
                                         shard.entry.sha256, actual)
                return DataError(f"{message} (changed on disk since it was verified)")
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        shards = ", ".join(shard.label for shard in self._shards)
        return DataError(f"{shards}: DALI cannot read split {self._split!r}: {first_line}")

    def __iter__(self) -> Iterator[Batch]:
        try:
            pipe = build_pipeline(*self._pipeline_args, epoch_seed(self._seed, self._rank, self._epoch), self._device_id)
            iterator = DALIGenericIterator(
                [pipe], OUTPUTS, reader_name="reader",
                last_batch_policy=LastBatchPolicy.DROP if self._train else LastBatchPolicy.PARTIAL,
            )
        except RuntimeError as error:
            raise self._data_error(error) from None
        self._epoch += 1
        try:
            produced = 0
            while produced < self._length:
                try:
                    (outputs,) = next(iterator)
                except StopIteration:
                    break
                except RuntimeError as error:
                    raise self._data_error(error) from None
                produced += 1  # beyond `len()`: the rank holding one sample more than the others drops it
                yield Batch(
                    source=outputs["source"].to(self._device, non_blocking=True),
                    target=outputs["target"].to(self._device, non_blocking=True),
                    index=outputs["index"].view(-1).to(self._device),
                    flip=outputs["flip"].view(-1).bool().to(self._device),
                    crop=outputs["crop"].long().to(self._device),
                )
        finally:
            # The epoch's pipeline ends with it, also when a consumer stops early.
            del iterator, pipe
