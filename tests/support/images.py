"""Deterministic synthetic image pairs shared by the data tests and the fixtures."""

import numpy as np
from PIL import Image


def pair_halves(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic pair: a smooth colour field (target) and a quantised 'label map' of it (source).

    Different content left/right and top/bottom, so a wrong crop, flip or half shows up."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    target = np.asarray(Image.fromarray(low).resize((size, size), Image.BILINEAR))
    source = (target // 64 * 85).astype(np.uint8)
    return source, target


def pair_seed(split: str, number: int) -> int:
    return ("train", "val", "test").index(split) * 100_000 + number
