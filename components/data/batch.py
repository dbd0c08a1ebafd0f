"""The one batch format every loader yields and every method consumes."""

from typing import TypedDict

import torch


class Batch(TypedDict):
    """A training or evaluation batch.

    source, target: float32 N x C x H x W in [-1, 1], already augmented (the same crop and
        flip for both halves of a pair).
    index: int64 N, the sample's dataset index: its position in the split's sample list in
        the manifest, stable across `mode: append` runs. ATME's memory is keyed by it.
    flip: bool N, whether the pair was mirrored left-right.
    crop: int64 N x 2, the (top, left) corner of the crop inside the resized load_size image.
        With flip and crop a method can map anything it stores per sample back to the
        un-augmented frame.
    """

    source: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor
    flip: torch.Tensor
    crop: torch.Tensor
