"""A tiny synthetic paired task for the method tests: target = a fixed colour transform of the source.

Sources are smooth random colour fields (4 x 4 noise upsampled); the target permutes and
scales the channels. Batches follow components/data/batch.py, with random flips and crops
recorded as a real loader would (crop then flip, the pix2pix order).
"""

import pytest
import torch
from torch.nn import functional as F

from components.data.batch import Batch


@pytest.fixture
def single_thread():
    """Run on one intra-op thread: these networks are too small to gain from two, and with
    other processes on the two cores OpenMP's spinning threads slowed the tests about 8x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def colour_transform(source: torch.Tensor) -> torch.Tensor:
    return 0.8 * source[:, [2, 0, 1]] - 0.1


def make_sources(count: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


class SyntheticPairs:
    """An in-memory dataset yielding shuffled batches; each epoch's order depends only on (seed, epoch)."""

    def __init__(self, count: int = 32, size: int = 32, batch_size: int = 4, seed: int = 0, flip: bool = True, load_size: int | None = None):
        self.size, self.batch_size, self.seed, self.flip = size, batch_size, seed, flip
        self.load_size = load_size or size
        self.sources = make_sources(count, self.load_size, seed)
        self.targets = colour_transform(self.sources)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.sources)

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> Batch:
        n = len(indices)
        flips = (torch.rand(n, generator=generator) < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool)
        margin = self.load_size - self.size
        crops = torch.randint(0, margin + 1, (n, 2), generator=generator)
        sources, targets = [], []
        for i, index in enumerate(indices.tolist()):
            top, left = crops[i].tolist()
            window = (slice(None), slice(top, top + self.size), slice(left, left + self.size))
            source, target = self.sources[index][window], self.targets[index][window]
            if flips[i]:
                source, target = source.flip(-1), target.flip(-1)
            sources.append(source)
            targets.append(target)
        return {
            "source": torch.stack(sources),
            "target": torch.stack(targets),
            "index": indices.long(),
            "flip": flips,
            "crop": crops.long(),
        }

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            yield self.batch(order[start : start + self.batch_size], generator)

    def steps(self, count: int):
        """`count` batches, continuing across epochs."""
        produced = 0
        while produced < count:
            for batch in self:
                yield batch
                produced += 1
                if produced == count:
                    return
