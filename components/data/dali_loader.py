"""The DALI backend: `fn.readers.webdataset` -> decode (GPU `mixed` on CUDA, CPU otherwise) -> paired augmentation."""

from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from components.config.data import LoaderParams
from components.data.batch import Batch
from components.data.loaders import Backend, batches_per_epoch, owned_indices
from components.data.manifest import Manifest

OUTPUTS = ["source", "target", "index", "flip", "crop"]


def build_pipeline(
    manifest: Manifest, split: str, loader: LoaderParams, batch_size: int, train: bool,
    rank: int, world_size: int, pipeline_seed: int, device_id: int | None,
) -> Pipeline:
    """The DALI graph. Each random value is drawn once per sample and fed to both images'
    operators, which is what makes the crop and flip shared by source and target."""
    shards = manifest.split(split).shards
    out_size = manifest.image_size  # the one image size the data was prepared at
    resize_to = loader.load_size_for(out_size) if train else out_size
    pipe = Pipeline(
        batch_size=batch_size, num_threads=loader.num_threads, device_id=device_id,
        seed=pipeline_seed, prefetch_queue_depth=loader.prefetch,
    )
    with pipe:
        source, target, index = fn.readers.webdataset(
            paths=[str(manifest.root / s.tar) for s in shards],
            index_paths=[str(manifest.root / s.index) for s in shards],
            ext=["src.jpg", "tgt.jpg", "index"],
            dtypes=[types.UINT8, types.UINT8, types.INT64],
            missing_component_behavior="error",
            shard_id=rank, num_shards=world_size,
            # stick_to_shard: a rank keeps the same samples every epoch (see loaders.py);
            # shuffling happens inside the rank's part only.
            stick_to_shard=True,
            random_shuffle=train,
            initial_fill=max(1, min(loader.shuffle_buffer, len(owned_indices(manifest.split(split).count, rank, world_size)))),
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
            if resize_to != manifest.image_size:
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
        self, manifest: Manifest, split: str, loader: LoaderParams, batch_size: int, train: bool,
        rank: int, world_size: int, seed: int, device: torch.device,
    ):
        self.manifest = manifest
        count = manifest.split(split).count
        self.owned = owned_indices(count, rank, world_size)
        self._length = batches_per_epoch(count, batch_size, train, rank, world_size)
        self._device = device
        self._train, self._seed, self._rank, self._epoch = train, seed, rank, 0
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
        self._pipeline_args = (manifest, split, loader, batch_size, train, rank, world_size)
        self._device_id = device_id

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Start the next `iter()` at this epoch (a resumed run picks up the same random draws)."""
        self._epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        pipe = build_pipeline(*self._pipeline_args, epoch_seed(self._seed, self._rank, self._epoch), self._device_id)
        iterator = DALIGenericIterator(
            [pipe], OUTPUTS, reader_name="reader",
            last_batch_policy=LastBatchPolicy.DROP if self._train else LastBatchPolicy.PARTIAL,
        )
        self._epoch += 1
        try:
            for produced, (outputs,) in enumerate(iterator):
                if produced == self._length:
                    break  # the rank holding one sample more than the others: that one is dropped
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
