"""The built-in data set: edge map -> photo pairs cut from photographs bundled in scikit-image.

It lets `dvc repro` run on a fresh machine with no download. Pair i of a split is a seeded
random square crop of one bundled photo, resized to image_size; the target is the crop and the
source its Canny edge map (black lines on white, like a sketch). Each pair depends only on
(seed, split, i), so raising a count appends pairs and never changes the existing ones.
"""

import functools
import hashlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from skimage.color import rgb2gray
from skimage.feature import canny

from components.config.data import BuiltinSourceParams
from components.data.sources import SourceListing, SourcePair

# Explicit table (no lookup by name string): each entry is a loader of a bundled RGB photo.
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skimage.data.astronaut,
    "chelsea": skimage.data.chelsea,
    "coffee": skimage.data.coffee,
    "rocket": skimage.data.rocket,
    "immunohistochemistry": skimage.data.immunohistochemistry,
    "retina": skimage.data.retina,
}


def _split_seed(seed: int, split: str, index: int) -> list[int]:
    # A stable integer for the split name (Python's hash() is salted per process).
    return [seed, int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "big"), index]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@functools.lru_cache(maxsize=len(PHOTOS))
def _photo(name: str) -> np.ndarray:
    return PHOTOS[name]()


def make_builtin_pair(params: BuiltinSourceParams, split: str, index: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(edge map, photo crop) for pair `index` of `split`, both image_size x image_size RGB uint8."""
    rng = np.random.default_rng(_split_seed(params.seed, split, index))
    photo = _photo(params.photos[int(rng.integers(len(params.photos)))])
    height, width = photo.shape[:2]
    shorter = min(height, width)
    side = int(rng.integers(int(shorter * params.min_crop_fraction), shorter + 1))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((image_size, image_size), Image.BICUBIC)
    target = np.asarray(crop)
    edges = canny(rgb2gray(target), sigma=1.0)
    source = np.where(edges, 0, 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    return source, target


def list_builtin_pairs(params: BuiltinSourceParams, image_size: int, direction: str) -> SourceListing:
    """The built-in pairs as a two-file source (PNG bytes, lossless), so they go through the
    same validation and encoding as user data. direction AtoB: edge map -> photo."""
    pairs = []
    counts = {"train": params.train_pairs, "val": params.val_pairs, "test": params.test_pairs}
    for split, count in counts.items():
        for index in range(count):
            key = f"{split}-{index:06d}"

            def read(split: str = split, index: int = index) -> tuple[bytes, bytes]:
                edges, photo = make_builtin_pair(params, split, index, image_size)
                halves = (edges, photo) if direction == "AtoB" else (photo, edges)
                return _png(halves[0]), _png(halves[1])

            origin = f"builtin:{split}/{index:06d}"
            pairs.append(SourcePair(split, key, (origin + "/source", origin + "/target"), read))
    pairs.sort(key=lambda pair: (pair.split, pair.key))
    return SourceListing("builtin", "two_files", pairs, [])


def write_builtin_folder(params: BuiltinSourceParams, image_size: int, out_dir: Path) -> dict[str, int]:
    """Write the built-in pairs as a pix2pix folder: out_dir/<split>/<index>.png, edge map on the
    left, photo on the right (so `direction: AtoB` reads edge map -> photo).

    PNG keeps the pairs lossless until `prepare` encodes them once. The folder is built beside
    out_dir and swapped in whole, so a crash never leaves a half-written source behind.
    """
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    counts = {"train": params.train_pairs, "val": params.val_pairs, "test": params.test_pairs}
    staging.mkdir(parents=True)
    for split, count in counts.items():
        if count == 0:
            continue  # an empty folder would be an "empty split" to prepare; no folder lets it carve val
        (staging / split).mkdir()
        for index in range(count):
            edges, photo = make_builtin_pair(params, split, index, image_size)
            side_by_side = np.concatenate([edges, photo], axis=1)
            (staging / split / f"{index:06d}.png").write_bytes(_png(side_by_side))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return counts
