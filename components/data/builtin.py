"""The built-in data set: colour label map -> photo pairs cut from photographs bundled in scikit-image.

It lets `dvc repro` run on a fresh machine with no download, and it is a task the default
small pix2pix visibly learns in a minute or two on a CPU: the classic "label map -> photo"
translation (facades, Cityscapes) in miniature.

Pair i of a split is a seeded random square crop of one bundled photo, resized to image_size
and lightly smoothed (the fine texture a label map cannot predict is taken out): that is the
target. The source is its label map: every pixel gets the class of the nearest of
`label_classes` reference colours, and each class is painted in its own fixed, unrelated
palette colour, so the network has to learn what each label looks like. The reference colours
are a seeded k-means of the bundled photos' pixels, so they depend only on the params.

Each pair depends only on (params, split, i): raising a count appends pairs and never changes
the existing ones.
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
from skimage.filters import gaussian

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

# The colours the label map paints its classes in: Sasha Trubetskoy's list of distinct colours
# (the first 16). Unrelated to the photo colours on purpose: a label is a name, not a hint.
LABEL_PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
        (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
        (170, 110, 40), (255, 250, 200), (128, 0, 0), (0, 0, 128),
    ],
    dtype=np.uint8,
)

_KMEANS_PIXELS_PER_PHOTO = 4000
_KMEANS_ITERATIONS = 30


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


@functools.lru_cache(maxsize=8)
def reference_colours(photos: tuple[str, ...], classes: int, seed: int) -> np.ndarray:
    """The label classes' reference colours (classes x 3, float RGB), darkest first: a seeded
    k-means (Lloyd's algorithm) of pixels drawn evenly from the chosen photos."""
    rng = np.random.default_rng([seed, classes])
    samples = []
    for name in photos:
        pixels = _photo(name).reshape(-1, 3)
        samples.append(pixels[rng.integers(len(pixels), size=_KMEANS_PIXELS_PER_PHOTO)])
    pixels = np.concatenate(samples).astype(np.float64)
    centres = pixels[rng.choice(len(pixels), size=classes, replace=False)]
    for _ in range(_KMEANS_ITERATIONS):
        nearest = _nearest(pixels, centres)
        for k in range(classes):
            members = pixels[nearest == k]
            if len(members):
                centres[k] = members.mean(axis=0)
    return centres[np.argsort(centres @ np.array([0.299, 0.587, 0.114]))]


def _nearest(pixels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return ((pixels[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)


def make_builtin_pair(params: BuiltinSourceParams, split: str, index: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(label map, smoothed photo crop) for pair `index` of `split`, both image_size x image_size RGB uint8."""
    rng = np.random.default_rng(_split_seed(params.seed, split, index))
    photo = _photo(params.photos[int(rng.integers(len(params.photos)))])
    height, width = photo.shape[:2]
    shorter = min(height, width)
    side = int(rng.integers(int(shorter * params.min_crop_fraction), shorter + 1))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((image_size, image_size), Image.BICUBIC)
    smoothed = gaussian(np.asarray(crop, dtype=np.float64), sigma=params.target_smoothing, channel_axis=-1,
                        preserve_range=True)
    target = np.clip(np.rint(smoothed), 0, 255).astype(np.uint8)
    centres = reference_colours(tuple(params.photos), params.label_classes, params.seed)
    labels = _nearest(smoothed.reshape(-1, 3), centres).reshape(image_size, image_size)
    return LABEL_PALETTE[labels], target


def list_builtin_pairs(params: BuiltinSourceParams, image_size: int, direction: str) -> SourceListing:
    """The built-in pairs as a two-file source (PNG bytes, lossless), so they go through the
    same validation and encoding as user data. direction AtoB: label map -> photo."""
    pairs = []
    counts = {"train": params.train_pairs, "val": params.val_pairs, "test": params.test_pairs}
    for split, count in counts.items():
        for index in range(count):
            key = f"{split}-{index:06d}"

            def read(split: str = split, index: int = index) -> tuple[bytes, bytes]:
                labels, photo = make_builtin_pair(params, split, index, image_size)
                halves = (labels, photo) if direction == "AtoB" else (photo, labels)
                return _png(halves[0]), _png(halves[1])

            origin = f"builtin:{split}/{index:06d}"
            pairs.append(SourcePair(split, key, (origin + "/source", origin + "/target"), read))
    pairs.sort(key=lambda pair: (pair.split, pair.key))
    return SourceListing("builtin", "two_files", pairs, [])


def write_builtin_folder(params: BuiltinSourceParams, image_size: int, out_dir: Path) -> dict[str, int]:
    """Write the built-in pairs as a pix2pix folder: out_dir/<split>/<index>.png, label map on
    the left, photo on the right (so `direction: AtoB` reads label map -> photo).

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
            labels, photo = make_builtin_pair(params, split, index, image_size)
            side_by_side = np.concatenate([labels, photo], axis=1)
            (staging / split / f"{index:06d}.png").write_bytes(_png(side_by_side))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return counts
